"""Many users at once, a process killed mid-write, and what the server will serve."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file

from library import FeatureLibrary, load_model
from tests.conftest import distinct_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(demo_library, launch_app, tmp_path):
    return launch_app(demo_library, concurrency=4), demo_library, tmp_path


def assert_library_consistent(library):
    state = torch.load(library.features_path, weights_only=True)
    assert state["files"] == library.files
    assert len(set(state["files"])) == len(state["files"]) == state["features"].shape[0]
    assert len(set(state["sha256"])) == len(state["sha256"])
    on_disk = {p.name for p in library.image_dir.iterdir() if not p.name.startswith(".")}
    assert on_disk == set(state["files"])


def test_sixteen_users_classify_add_and_search_at_once(served):
    url, library, tmp_path = served
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    shared = uploads / "shared.png"
    distinct_image(999, (40, 40)).save(shared)
    errors, inconsistent = [], []
    start = threading.Barrier(16)

    def user(index):
        try:
            client = Client(url, verbose=False, download_files=False)
            mine = []
            for j in range(2):
                path = uploads / f"user{index}_{j}.png"
                distinct_image(index * 10 + j, (40, 40)).save(path)
                mine.append(path)
            start.wait()
            client.predict(handle_file(str(mine[0])), "cat, dog", False, api_name="/classify")
            client.predict(handle_file(str(shared)), "cat, dog", False, api_name="/classify")
            client.predict([handle_file(str(mine[1])), handle_file(str(shared))], api_name="/add_images")
            for item in client.predict("a photo", 50, api_name="/search_text"):
                name = item["caption"].split(" · ", 1)[1]
                if not (library.image_dir / name).is_file():
                    inconsistent.append(name)
            client.close()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not inconsistent
    assert len(library) == 4 + 16 * 2 + 1  # starter photos, two per user, one shared
    assert_library_consistent(library)


def test_searches_during_writes_always_see_rows_with_their_files(tmp_path, tiny_model):
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", tiny_model, progress=False)
    library.add(distinct_image(0), name="first.png")
    stop = threading.Event()
    problems = []

    def searcher():
        while not stop.is_set():
            for entry in library.search_text("a photo", k=1000):
                if not entry.path.is_file() or entry.file not in library:
                    problems.append(entry.file)

    readers = [threading.Thread(target=searcher) for _ in range(3)]
    for reader in readers:
        reader.start()
    for i in range(1, 60):
        library.add(distinct_image(i), name=f"{i}.png")
    stop.set()
    for reader in readers:
        reader.join()
    assert not problems and len(library) == 60


CHILD = textwrap.dedent("""
    import os, signal, sys
    from PIL import Image
    from library import FeatureLibrary, load_model
    import library.store as store

    images, features, checkpoint, mode, small_library_rows = sys.argv[1:6]
    store.SMALL_LIBRARY_ROWS = int(small_library_rows)
    library = FeatureLibrary(images, features, load_model(checkpoint, "cpu"), progress=False)
    if mode == "kill-after-file-write":
        # Die after the 4th image file is written but before its journal record.
        calls = {"n": 0}
        original = store.FeatureLibrary._journal_append
        def journal_then_maybe_die(self, *args):
            calls["n"] += 1
            if calls["n"] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, *args)
        store.FeatureLibrary._journal_append = journal_then_maybe_die
    for i in range(10_000):
        colour = ((i * 37) % 256, (i * 91 + 40) % 256, (i * 53 + 90) % 256)
        entry = library.add(Image.new("RGB", (24, 24), colour), name=f"bulk{i}.png")
        print("ACK", entry.file, flush=True)
""")


def run_child(tmp_path, checkpoint, mode, kill_after_acks=None, small_library_rows=10_000):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "images"), str(tmp_path / "f.pth"), checkpoint, mode,
         str(small_library_rows)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    acknowledged = []
    for line in child.stdout:
        acknowledged.append(line.split()[1])
        if kill_after_acks and len(acknowledged) >= kill_after_acks:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    acknowledged += [line.split()[1] for line in child.stdout.read().splitlines() if line.startswith("ACK")]
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.parametrize("small_library_rows", [10_000, 0])  # rewrite every add / journal only
def test_sigkill_during_bulk_add_loses_no_acknowledged_image(tmp_path, tiny_checkpoint, small_library_rows):
    (tmp_path / "images").mkdir()
    acknowledged = run_child(tmp_path, tiny_checkpoint, "plain", kill_after_acks=25,
                             small_library_rows=small_library_rows)
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", load_model(tiny_checkpoint, "cpu"),
                             progress=False)
    assert set(acknowledged) <= set(library.files)
    assert_library_consistent(library)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_image_written_but_not_indexed_is_indexed_on_restart(tmp_path, tiny_checkpoint, tiny_model):
    (tmp_path / "images").mkdir()
    acknowledged = run_child(tmp_path, tiny_checkpoint, "kill-after-file-write")
    assert len(acknowledged) == 3
    orphan = [p.name for p in (tmp_path / "images").iterdir()
              if not p.name.startswith(".") and p.name not in acknowledged]
    assert len(orphan) == 1  # the 4th image: on disk, in no journal record
    (tmp_path / "images" / ".x.png.tmp-deadbeef").write_bytes(b"half a file")
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", tiny_model, progress=False)
    assert library.last_sync.indexed >= 1 and orphan[0] in library.files
    assert set(acknowledged) <= set(library.files)
    assert_library_consistent(library)
    assert not (tmp_path / "images" / ".x.png.tmp-deadbeef").exists()


def test_server_serves_the_image_folder_and_nothing_else(served):
    url, library, tmp_path = served
    secret = tmp_path / "secret.txt"
    secret.write_text("private")

    def status(path):
        try:
            with urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(library.image_dir / "coffee.png") == 200
    assert status(secret) in (403, 404)
    assert status(library.features_path) in (403, 404)
    assert status(library.image_dir / ".." / "secret.txt") in (403, 404)
    assert status(ROOT / "app.py") in (403, 404)


HOLDER = textwrap.dedent("""
    import sys, time
    from library import FeatureLibrary, load_model
    library = FeatureLibrary(sys.argv[1], sys.argv[2], load_model(sys.argv[3], "cpu"), progress=False)
    print("READY", flush=True)
    time.sleep(60)
""")


def test_a_second_writing_process_is_refused_until_the_first_is_gone(tmp_path, tiny_checkpoint, tiny_model):
    from library import LibraryError
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    images, features = tmp_path / "images", tmp_path / "f.pth"
    holder = subprocess.Popen([sys.executable, str(script), str(images), str(features), tiny_checkpoint],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "READY"
        with pytest.raises(LibraryError, match="open for writing in another process"):
            FeatureLibrary(images, features, tiny_model, progress=False)
        FeatureLibrary(images, features, tiny_model, read_only=True, progress=False)  # readers may
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    library = FeatureLibrary(images, features, tiny_model, progress=False)  # the kernel let go
    library.add(distinct_image(1), name="after.png")
    library.close()
