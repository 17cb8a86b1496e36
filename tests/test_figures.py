import shutil
from pathlib import Path

import pytest
from PIL import Image

from library.cli import main
from library.figures import bar_chart, retrieval_figure
from tests.conftest import solid

ROOT = Path(__file__).resolve().parents[1]


def open_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_retrieval_figure_puts_the_query_left_of_k_results(tmp_path):
    results = [(solid(c, (60, 30)), s, f"{c}.png") for c, s in (("red", 0.91234), ("blue", 0.5))]
    one = open_png(retrieval_figure(solid("green", (30, 90)), results, tmp_path / "two.png"))
    results.append((solid("white", (2000, 1000)), 0.1, "a_very_long_file_name_" * 4 + ".jpg"))
    three = open_png(retrieval_figure(solid("green"), results, tmp_path / "sub" / "three.png"))
    assert three[0] > one[0]  # one more panel to the right
    assert three[0] > 2 * three[1]  # a row of panels


def test_retrieval_figure_with_a_text_query_and_other_formats(tmp_path):
    results = [(solid("red"), 0.3, "red.png")]
    path = retrieval_figure("a photo of something red", results, tmp_path / "text.svg")
    assert "<svg" in path.read_text()  # the suffix picks the format
    with pytest.raises(ValueError, match="no results"):
        retrieval_figure("x", [], tmp_path / "empty.png")


def test_bar_chart_handles_missing_values_and_many_classes(tmp_path):
    open_png(bar_chart(["cat", "dog", "empty"], [0.75, 1.0, float("nan")], tmp_path / "bars.png",
                       title="accuracy per class", ylabel="top-1"))
    names = [f"class {i}" for i in range(150)]
    open_png(bar_chart(names, [i / 150 for i in range(150)], tmp_path / "many.png",
                       title="many", ylabel="precision"))


def test_figure_command_for_image_and_text_queries(tmp_path, tiny_checkpoint, capsys):
    images = tmp_path / "demo"
    images.mkdir()
    names = ("coffee.png", "rocket.jpg", "chelsea_cat.png", "astronaut.png", "flower.jpg")
    for name in names:
        shutil.copy(ROOT / "demo" / name, images / name)
    out = tmp_path / "result.png"
    assert main(["figure", "--images", str(images), "--query", str(images / "coffee.png"), "--k", "3",
                 "--out", str(out), "--model", tiny_checkpoint]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[-1] == f"figure written to {out}"
    assert "coffee.png" not in "".join(printed[:3])  # the query itself is left out
    width, height = open_png(out)
    assert width > 3 * height

    assert main(["figure", "--images", str(images), "--query", "a cat on a sofa", "--k", "6",
                 "--out", str(tmp_path / "text.png"), "--model", tiny_checkpoint]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(names)  # k capped at the library
    open_png(tmp_path / "text.png")


def test_figure_command_errors(tmp_path, tiny_checkpoint, capsys):
    images = tmp_path / "images"
    images.mkdir()
    solid("red").save(images / "red.png")
    base = ["figure", "--images", str(images), "--model", tiny_checkpoint, "--out", str(tmp_path / "f.png")]
    assert main([*base, "--query", str(tmp_path / "missing.jpg")]) == 1
    assert "error: query image" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "nowhere"), *base[3:], "--query", "red"]) == 1
    assert "error: image folder" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert main([*base, "--query", "red", "--k", "0"]) == 1
    assert "error: k must be" in capsys.readouterr().err
    (images / "red.png").unlink()
    assert main([*base, "--query", "red"]) == 1
    assert "has no images" in capsys.readouterr().err
