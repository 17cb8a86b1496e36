import subprocess
import sys
from pathlib import Path

import torch

from library.cli import main
from tests.conftest import distinct_image

ROOT = Path(__file__).resolve().parents[1]


def test_index_then_search_from_the_command_line(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        distinct_image(i, (40, 30)).save(folder / f"p{i}.png")
    distinct_image(0, (40, 30)).save(folder / "copy_of_p0.png")
    (folder / "bad.jpg").write_bytes(b"nope")

    assert main(["index", "--images", str(folder), "--model", tiny_checkpoint, "--batch-size", "2"]) == 0
    out = capsys.readouterr()
    assert "5 images in the library; 5 indexed, 1 skipped as duplicate, 1 refused as unreadable" in out.out
    assert "bad.jpg" in out.err
    state = torch.load(folder / "features_library.pth", weights_only=True)
    assert len(state["files"]) == 5

    assert main(["search", "--images", str(folder), "--model", tiny_checkpoint, "--k", "3", "a cat"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(line.split()[1] in state["files"] for line in lines)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "library", "search", "--images", str(tmp_path), "--model",
         str(tmp_path / "missing.pt"), "x"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert "--model" in result.stderr
