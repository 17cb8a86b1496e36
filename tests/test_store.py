import threading

import pytest
import torch

import library.store as store_module
from library import FeatureLibrary, ImageLoadError, LibraryFormatError, ReadOnlyLibraryError
from library.store import FORMAT_VERSION
from tests.conftest import FakeEncoder, distinct_image, solid


def png_bytes(image):
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_library(tmp_path, model=None, **kwargs):
    return FeatureLibrary(tmp_path / "images", tmp_path / "features_library.pth",
                          model or FakeEncoder(), progress=False, **kwargs)


def assert_aligned(library):
    """Row i of the saved file is the embedding of files[i], and every file exists."""
    state = torch.load(library.features_path, weights_only=True)
    assert state["files"] == library.files
    assert len(state["sha256"]) == len(state["files"]) == state["features"].shape[0]
    for i, file in enumerate(state["files"]):
        path = library.image_dir / file
        assert path.is_file()
        expected = library.model.encode_pixels(
            library.model.preprocess(__import__("PIL.Image").Image.open(path))[None])[0]
        # Stored as float16; on a CPU with native bf16 the in-memory matrix is bf16 (8 bits of
        # mantissa), so a value near 1 may be off by up to 2**-8.
        assert torch.allclose(state["features"][i].float(), expected, atol=4e-3)


def test_add_search_reopen_keeps_rows_aligned(tmp_path):
    library = open_library(tmp_path)
    for colour in ("red", "green", "blue"):
        library.add(solid(colour), name=f"{colour}.png")
    results = library.search_text("something red", k=3)
    assert [r.file for r in results][0].endswith("-red.png")
    assert results[0].score > results[1].score >= results[2].score
    library.close()

    reopened = open_library(tmp_path)
    assert reopened.files == library.files
    assert reopened.search_text("blue sky", k=1)[0].file.endswith("-blue.png")
    assert_aligned(reopened)


def test_file_format_holds_version_model_and_hashes(tmp_path):
    library = open_library(tmp_path)
    entry = library.add(solid("red"), name="r.png")
    state = torch.load(library.features_path, weights_only=True)
    assert state["format_version"] == FORMAT_VERSION
    assert state["model"] == "fake-colour-model" and state["dim"] == FakeEncoder.dim
    import hashlib
    assert state["sha256"] == [hashlib.sha256(entry.path.read_bytes()).hexdigest()]


def test_duplicate_add_returns_existing_entry_without_new_row_or_file(tmp_path):
    library = open_library(tmp_path)
    first = library.add(png_bytes(solid("red")), name="one.png")
    second = library.add(png_bytes(solid("red")), name="two.png")
    assert second == first
    assert len(library) == 1
    assert sorted(p.name for p in library.image_dir.iterdir()) == [first.file]
    results = library.add_many([("a.png", png_bytes(solid("blue"))), ("b.png", png_bytes(solid("blue")))])
    assert [r.status for r in results] == ["added", "duplicate"]
    assert len(library) == 2


def test_stored_names_are_generated_never_client_paths(tmp_path):
    library = open_library(tmp_path)
    entry = library.add(png_bytes(solid("green")), name="../../etc/passwd .jpg")
    assert "/" not in entry.file and ".." not in entry.file
    assert entry.path.parent == library.image_dir
    assert entry.file.endswith(".png")  # suffix from the decoded format, not the client
    assert not (tmp_path / "etc").exists()


def test_remove_drops_row_and_file(tmp_path):
    library = open_library(tmp_path)
    red = library.add(solid("red"), name="red.png")
    blue = library.add(solid("blue"), name="blue.png")
    library.remove(red.file)
    assert library.files == [blue.file]
    assert not red.path.exists()
    with pytest.raises(KeyError):
        library.remove(red.file)
    assert_aligned(open_library(tmp_path))


def test_missing_image_is_dropped_and_new_image_indexed_on_reopen(tmp_path):
    library = open_library(tmp_path)
    red = library.add(solid("red"), name="red.png")
    blue = library.add(solid("blue"), name="blue.png")
    library.close()
    red.path.unlink()
    solid("green").save(library.image_dir / "dropped_in.png")
    (library.image_dir / "notes.txt").write_text("not an image")

    reopened = open_library(tmp_path)
    assert reopened.last_sync.dropped == 1 and reopened.last_sync.indexed == 1
    assert sorted(reopened.files) == sorted([blue.file, "dropped_in.png"])
    assert reopened.search_text("green", k=1)[0].file == "dropped_in.png"
    assert_aligned(reopened)


def test_first_sight_reports_duplicates_and_unreadable_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    solid("red").save(folder / "a.png")
    solid("red").save(folder / "b.png")  # same bytes
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    library = open_library(tmp_path)
    report = library.last_sync
    assert (report.indexed, report.duplicates) == (1, 1)
    assert [f for f, _ in report.refused] == ["broken.jpg"]
    assert "damaged" in report.refused[0][1] or "not a recognised" in report.refused[0][1]


def test_model_change_re_embeds_everything(tmp_path):
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    library.add(solid("blue"), name="blue.png")
    library.close()
    other = FakeEncoder(identity="another-model")
    reopened = open_library(tmp_path, model=other)
    assert reopened.last_sync.reembedded and reopened.last_sync.indexed == 2
    state = torch.load(reopened.features_path, weights_only=True)
    assert state["model"] == "another-model" and len(state["files"]) == 2
    assert_aligned(reopened)


def test_interrupted_save_leaves_a_loadable_library_and_loses_nothing(tmp_path, monkeypatch):
    library = open_library(tmp_path)
    red = library.add(solid("red"), name="red.png")

    real_replace = store_module.os.replace

    def crash_on_library_file(source, target):
        if str(target).endswith(".pth"):
            raise OSError("simulated crash between temporary write and replace")
        real_replace(source, target)

    monkeypatch.setattr(store_module.os, "replace", crash_on_library_file)
    blue = library.add(solid("blue"), name="blue.png")  # journaled; the rewrite fails
    state = torch.load(library.features_path, weights_only=True)
    assert state["files"] == [red.file]  # the old file, intact
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp-*")) and not list(library.image_dir.glob(".*tmp-*"))

    reopened = open_library(tmp_path)
    assert reopened.files == [red.file, blue.file]
    assert_aligned(reopened)


def test_torn_journal_tail_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SMALL_LIBRARY_ROWS", 0)
    monkeypatch.setattr(store_module, "COMPACT_FRACTION", 100.0)  # keep rows in the journal
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    library.add(solid("blue"), name="blue.png")
    assert library.journal_path.exists() and not library.features_path.exists()
    data = library.journal_path.read_bytes()
    library.journal_path.write_bytes(data[:-7])  # a crash in the middle of the last record
    reopened = open_library(tmp_path)
    # The blue image's row was torn, but its file is there: first sight indexes it again.
    assert len(reopened) == 2 and reopened.last_sync.indexed == 1
    assert_aligned(reopened)


def test_large_library_appends_to_journal_instead_of_rewriting(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SMALL_LIBRARY_ROWS", 2)
    monkeypatch.setattr(store_module, "COMPACT_FRACTION", 0.6)
    library = open_library(tmp_path)
    for i in range(2):  # up to SMALL_LIBRARY_ROWS: rewritten after every add
        library.add(distinct_image(i), name=f"{i}.png")
    saved = torch.load(library.features_path, weights_only=True)["files"]
    assert len(saved) == 2
    for i in (2, 3):  # 1 and 2 journal rows: under 0.6 of 3 and 4 rows, no rewrite
        library.add(distinct_image(i), name=f"{i}.png")
    assert torch.load(library.features_path, weights_only=True)["files"] == saved
    assert library.journal_path.stat().st_size > 0
    assert open_library(tmp_path).files == library.files  # the journal is replayed
    library.add(distinct_image(4), name="4.png")  # 3 journal rows >= 0.6 * 5: rewrite
    assert torch.load(library.features_path, weights_only=True)["files"] == library.files
    assert not library.journal_path.exists()


def test_concurrent_adds_lose_nothing_and_duplicate_nothing(tmp_path):
    library = open_library(tmp_path)
    images = [png_bytes(distinct_image(i)) for i in range(80)]
    errors = []

    def worker(offset):
        try:
            for i in range(offset, 80, 8):
                library.add(images[i], name=f"img{i}.png")
                library.add(images[(i + 1) % 80], name="again.png")  # races with its owner
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(library) == 80
    assert len([p for p in library.image_dir.iterdir() if not p.name.startswith(".")]) == 80
    library.close()
    reopened = open_library(tmp_path)
    assert len(reopened) == 80 and reopened.last_sync.indexed == 0
    assert_aligned(reopened)


def test_newer_format_refuses_to_open(tmp_path):
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    state = torch.load(library.features_path, weights_only=True)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, library.features_path)
    before = library.features_path.read_bytes()
    with pytest.raises(LibraryFormatError, match="newer version"):
        open_library(tmp_path)
    assert library.features_path.read_bytes() == before


def test_misaligned_file_is_refused_clearly(tmp_path):
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    state = torch.load(library.features_path, weights_only=True)
    state["files"].append("ghost.png")
    torch.save(state, library.features_path)
    with pytest.raises(LibraryFormatError, match="not aligned"):
        open_library(tmp_path)


def test_bad_image_is_refused_and_changes_nothing(tmp_path):
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    before = (library.files, library.features_path.read_bytes(), sorted(library.image_dir.iterdir()))
    with pytest.raises(ImageLoadError, match="evil.jpg"):
        library.add(b"<html>not an image</html>", name="evil.jpg")
    assert (library.files, library.features_path.read_bytes(), sorted(library.image_dir.iterdir())) == before


def test_search_edge_cases(tmp_path):
    library = open_library(tmp_path)
    assert library.search_text("red", k=5) == []
    library.add(solid("red"), name="red.png")
    library.add(solid("blue"), name="blue.png")
    assert len(library.search_text("red", k=50)) == 2  # k capped at the library size
    for bad_k in (0, -1, 2.5, "3", None, True):
        with pytest.raises(ValueError, match="k must be"):
            library.search_text("red", k=bad_k)
    with pytest.raises(ValueError, match="empty"):
        library.search_text("   ", k=1)


def test_search_image_excludes_the_query_itself(tmp_path):
    library = open_library(tmp_path)
    red = library.add(png_bytes(solid("red")), name="red.png")
    library.add(solid((0.9, 0.1, 0.0)), name="orange.png")
    library.add(solid("blue"), name="blue.png")
    results = library.search_image(png_bytes(solid("red")), k=5)
    assert red.file not in [r.file for r in results]
    assert results[0].file.endswith("-orange.png") and len(results) == 2


def test_read_only_library_writes_nothing(tmp_path):
    writable = open_library(tmp_path)
    writable.add(solid("red"), name="red.png")
    writable.close()
    solid("blue").save(tmp_path / "images" / "new.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    library = open_library(tmp_path, read_only=True)
    assert len(library) == 2  # the new image is indexed in memory only
    with pytest.raises(ReadOnlyLibraryError):
        library.add(solid("green"), name="green.png")
    assert library.search_text("blue", k=1)[0].file == "new.png"
    library.close()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_gallery_paging_and_iteration(tmp_path):
    library = open_library(tmp_path)
    added = [library.add(distinct_image(i), name=f"{i}.png").file for i in range(7)]
    assert [e.file for e in library] == added
    assert [e.file for e in library.entries(offset=3, limit=3)] == added[3:6]
    assert library.entries(offset=6, limit=10)[0].file == added[6]


def test_a_model_of_another_size_re_embeds_instead_of_crashing(tmp_path):
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    library.close()

    class WiderEncoder(FakeEncoder):
        dim = 16

    reopened = open_library(tmp_path, model=WiderEncoder(identity="wider-model"))
    assert reopened.last_sync.reembedded and len(reopened) == 1
    state = torch.load(reopened.features_path, weights_only=True)
    assert state["features"].shape == (1, 16) and state["dim"] == 16


def test_adds_after_a_torn_journal_tail_are_not_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SMALL_LIBRARY_ROWS", 0)
    monkeypatch.setattr(store_module, "COMPACT_FRACTION", 100.0)  # keep rows in the journal
    library = open_library(tmp_path)
    library.add(solid("red"), name="red.png")
    library.journal_path.write_bytes(library.journal_path.read_bytes() + b"CLJ1\x99torn")
    library._journal = None  # the crashed process's handle is gone
    # Opening without a sync (no rewrite) must still cut the torn tail off...
    reopened = open_library(tmp_path, sync=False)
    green = reopened.add(solid("green"), name="green.png")
    blue = reopened.add(solid("blue"), name="blue.png")
    # ...or these acknowledged rows would sit behind it, unreadable.
    again = open_library(tmp_path, sync=False)
    assert {green.file, blue.file} <= set(again.files) and len(again) == 3


def test_only_our_temporary_files_are_cleaned_up(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    solid("red").save(folder / "holiday.tmp-edit.png")  # a user's file, whatever its name
    (folder / ".red.png.tmp-0a1b2c3d").write_bytes(b"half an image")  # ours, from a crash
    (tmp_path / ".features_library.pth.tmp-deadbeef").write_bytes(b"half a library")
    (tmp_path / "notes.tmp-1").write_text("someone else's")
    library = open_library(tmp_path)
    assert (folder / "holiday.tmp-edit.png").exists() and "holiday.tmp-edit.png" in library
    assert (tmp_path / "notes.tmp-1").exists()
    assert not (folder / ".red.png.tmp-0a1b2c3d").exists()
    assert not (tmp_path / ".features_library.pth.tmp-deadbeef").exists()


def test_remove_deletes_the_file_before_the_row(tmp_path, monkeypatch):
    library = open_library(tmp_path)
    red = library.add(solid("red"), name="red.png")
    blue = library.add(solid("blue"), name="blue.png")

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rewrite")

    monkeypatch.setattr(library, "save", crash)
    with pytest.raises(OSError):
        library.remove(red.file)
    monkeypatch.undo()
    reopened = open_library(tmp_path)  # the row whose file is gone is dropped, not revived
    assert reopened.files == [blue.file] and not red.path.exists()


def test_a_failed_write_refuses_that_image_only(tmp_path, monkeypatch):
    library = open_library(tmp_path)
    real_write = store_module._atomic_write

    def disk_full_for_green(path, write):
        if "-green" in path.name:
            raise OSError(28, "No space left on device")
        real_write(path, write)

    monkeypatch.setattr(store_module, "_atomic_write", disk_full_for_green)
    results = library.add_many([("red.png", solid("red")), ("green.png", solid("green")),
                                ("blue.png", solid("blue"))])
    assert [r.status for r in results] == ["added", "refused", "added"]
    assert "No space left" in results[1].reason
    assert len(library) == 2
    assert_aligned(open_library(tmp_path))


def test_quota_refuses_adds_past_max_images(tmp_path):
    library = open_library(tmp_path, max_images=2)
    results = library.add_many([("r.png", solid("red")), ("g.png", solid("green")),
                                ("b.png", solid("blue")), ("r2.png", solid("red"))])
    assert [r.status for r in results] == ["added", "added", "refused", "duplicate"]
    assert results[2].reason == "the library is full (2 images)"
    assert len(library) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_adds_searches_and_classifies(tmp_path, tiny_checkpoint):
    from library import ZeroShotClassifier, load_model
    model = load_model(tiny_checkpoint, "cuda")
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", model, progress=False)
    entry = library.add(solid("red"), name="red.png")
    assert library.search_text("red", k=1)[0].file == entry.file
    result = ZeroShotClassifier(model).classify(library.feature(entry.file), "cat, dog")
    assert len(result) == 2
