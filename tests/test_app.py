"""The app's handlers as plain functions, and the whole app through gradio_client."""

import re
from pathlib import Path

import gradio as gr
import pytest
import torch

import app
from app import Handlers, Limits, build_demo
from library import FeatureLibrary
from tests.conftest import FakeEncoder, demo_photos, distinct_image, solid

CAPTION = re.compile(r"^-?\d+\.\d{3} · (.+)$")


@pytest.fixture
def colour_handlers(tmp_path):
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", FakeEncoder(), progress=False)
    for colour in ("red", "green", "blue"):
        library.add(solid(colour), name=f"{colour}.png")
    return Handlers(library, limits=Limits(gallery_page_size=2, max_k=10, max_files_per_add=3))


def saved_files(library):
    return torch.load(library.features_path, weights_only=True)["files"]


def upload(tmp_path, image, name):
    path = tmp_path / "uploads" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    return str(path)


def test_classify_returns_top5_and_adds_the_image_once(demo_library, tmp_path):
    handlers = Handlers(demo_library)
    image = upload(tmp_path, distinct_image(7, (64, 48)), "holiday.png")
    labels = "cat, dog, rocket, coffee, flower, galaxy, coins"
    probabilities, status = handlers.classify(image, labels, True)
    assert len(probabilities) == 5
    values = list(probabilities.values())
    assert values == sorted(values, reverse=True) and all(0 <= v <= 1 for v in values)
    assert set(probabilities) <= set(parse(labels))
    assert "added to the library" in status and len(demo_library) == 5
    new_file = re.search(r"\*\*(.+)\*\*", status).group(1)
    assert new_file.endswith("-holiday.png") and new_file in saved_files(demo_library)

    again, status = handlers.classify(image, labels, True)
    assert "Already in the library" in status and len(demo_library) == 5
    assert again == pytest.approx(probabilities)


def parse(labels):
    return [label.strip() for label in labels.split(",")]


def test_classify_errors_change_nothing(colour_handlers, tmp_path):
    library = colour_handlers.library
    before = saved_files(library)
    good = upload(tmp_path, solid("yellow"), "y.png")
    with pytest.raises(gr.Error, match="no labels"):
        colour_handlers.classify(good, " , ", True)
    with pytest.raises(gr.Error, match="at most 64"):
        colour_handlers.classify(good, ",".join(f"l{i}" for i in range(65)), True)
    with pytest.raises(gr.Error, match="not a recognised image"):
        colour_handlers.classify(upload(tmp_path, b"%PDF-1.4 hello", "doc.jpg"), "red", True)
    with pytest.raises(gr.Error, match="Upload an image"):
        colour_handlers.classify(None, "red", True)
    assert saved_files(library) == before and len(library) == 3


def test_classify_picks_the_right_colour(colour_handlers, tmp_path):
    probabilities, _ = colour_handlers.classify(upload(tmp_path, solid("blue"), "b.png"),
                                                "red, green, blue", False)
    assert max(probabilities, key=probabilities.get) == "blue"


def test_read_only_classifies_without_storing(tmp_path, tiny_model):
    library = FeatureLibrary(demo_photos(tmp_path / "images"), tmp_path / "f.pth", tiny_model,
                             progress=False)
    library.close()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    read_only = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", tiny_model,
                               read_only=True, progress=False)
    handlers = Handlers(read_only)
    image = upload(tmp_path, distinct_image(3, (50, 50)), "visitor.png")
    before[Path(image)] = Path(image).stat().st_mtime_ns
    before[Path(image).parent] = Path(image).parent.stat().st_mtime_ns
    probabilities, status = handlers.classify(image, "cat, dog", True)
    assert len(probabilities) == 2 and "not stored" in status
    assert len(handlers.search_image(image, 3)) == 3
    with pytest.raises(gr.Error, match="read-only"):
        handlers.add_images([image])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_text_search_captions_scores_and_order(colour_handlers):
    items = colour_handlers.search_text("a red thing", 6)
    assert len(items) == 3
    captions = [caption for _, caption in items]
    scores = [float(c.split(" · ")[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert all(CAPTION.match(c) for c in captions)
    assert CAPTION.match(captions[0]).group(1).endswith("-red.png")
    path, caption = items[0]
    assert Path(path).parent == colour_handlers.library.image_dir
    assert Path(path).name == CAPTION.match(caption).group(1)


@pytest.mark.parametrize("k, expected", [(1, 1), (2.0, 2), ("3", 3), (10**9, 3)])
def test_k_is_parsed_and_capped(colour_handlers, k, expected):
    assert len(colour_handlers.search_text("red", k)) == expected


@pytest.mark.parametrize("k", [0, -3, "many", None, float("nan"), float("inf")])
def test_bad_k_is_a_clear_error(colour_handlers, k):
    with pytest.raises(gr.Error, match="k must be a number from 1 to 10"):
        colour_handlers.search_text("red", k)


def test_empty_query_and_long_query(colour_handlers):
    with pytest.raises(gr.Error, match="Type something"):
        colour_handlers.search_text("   ", 3)
    long_query = "red " * 100_000
    assert CAPTION.match(colour_handlers.search_text(long_query, 1)[0][1]).group(1).endswith("-red.png")
    assert len(colour_handlers.search_text("红色的猫 🐱 red", 2)) == 2


def test_image_search_excludes_the_upload_itself(colour_handlers, tmp_path):
    red_again = upload(tmp_path, solid("red"), "red.png")  # same bytes as the stored red image
    items = colour_handlers.search_image(red_again, 5)
    assert len(items) == 2 and not any(c.endswith("-red.png") for _, c in items)
    with pytest.raises(gr.Error, match="not a recognised image"):
        colour_handlers.search_image(upload(tmp_path, b"GIF89a garbage", "x.gif"), 5)


def test_add_images_reports_added_duplicate_refused(colour_handlers, tmp_path):
    files = [upload(tmp_path, solid("yellow"), "yellow.png"),
             upload(tmp_path, solid("red"), "red_again.png"),
             upload(tmp_path, b"\x00" * 100, "zeros.jpg")]
    status, gallery = colour_handlers.add_images(files)
    assert status.startswith("1 added, 1 already in the library, 1 refused.")
    assert "zeros.jpg: not a recognised image" in status
    assert gallery[0][1].endswith("-yellow.png")  # newest first
    assert len(colour_handlers.library) == 4 and len(saved_files(colour_handlers.library)) == 4
    with pytest.raises(gr.Error, match="at most 3"):
        colour_handlers.add_images(files + files)
    with pytest.raises(gr.Error, match="Choose one or more"):
        colour_handlers.add_images([])


def test_gallery_pages_newest_first(colour_handlers):
    files = colour_handlers.library.files  # red, green, blue in row order
    assert [c for _, c in colour_handlers.gallery(1)] == [files[2], files[1]]
    assert [c for _, c in colour_handlers.gallery(2)] == [files[0]]
    assert colour_handlers.gallery(99) == colour_handlers.gallery(2)
    assert colour_handlers.gallery("junk") == colour_handlers.gallery(1)
    assert colour_handlers.gallery_title(2) == "**3 images** in the library, page 2 of 2 (newest first)"


def test_build_demo_has_exactly_the_named_endpoints(colour_handlers):
    demo = build_demo(colour_handlers.library)
    api = demo.get_api_info()["named_endpoints"]
    assert set(api) == {"/classify", "/search_text", "/search_image", "/add_images", "/gallery"}
    assert [p["parameter_name"] for p in api["/classify"]["parameters"]] == ["image", "labels", "ensemble"]
    assert len(api["/classify"]["returns"]) == 1


def test_launch_serves_only_the_image_folder(colour_handlers):
    args = app.parse_args(["--port", "7999"])
    options = app.launch_options(args, colour_handlers.library, Limits(max_upload_mb=7))
    assert options["allowed_paths"] == [str(colour_handlers.library.image_dir)]
    assert str(colour_handlers.library.features_path) in options["blocked_paths"]
    assert options["max_file_size"] == "7mb" and options["server_port"] == 7999


def test_options_come_from_flags_then_environment(monkeypatch):
    monkeypatch.setenv("CLIP_MODEL", "/models/x.pt")
    monkeypatch.setenv("CLIP_IMAGES_DIR", "/data/images")
    monkeypatch.setenv("CLIP_FEATURES", "/data/features_library.pth")
    monkeypatch.setenv("CLIP_READ_ONLY", "1")
    args = app.parse_args([])
    assert (args.model, str(args.images), str(args.features), args.read_only) == (
        "/models/x.pt", "/data/images", "/data/features_library.pth", True)
    assert app.parse_args(["--model", "RN50"]).model == "RN50"
    monkeypatch.delenv("CLIP_READ_ONLY")
    monkeypatch.delenv("CLIP_MODEL")
    assert app.parse_args([]).model == "ViT-B/32" and not app.parse_args([]).read_only


def test_main_exits_with_the_clear_message_when_weights_cannot_download(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    import library.model

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(library.model, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    code = app.main(["--images", str(tmp_path / "img"), "--features", str(tmp_path / "f.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "ViT-B/32" in err and "--model PATH" in err and "Traceback" not in err
    assert not (tmp_path / "f.pth").exists()


def test_preprocess_and_library_quota_options():
    args = app.parse_args(["--preprocess", "pad", "--max-library-images", "5"])
    assert args.preprocess == "pad" and args.max_library_images == 5


def test_a_full_library_refuses_adds_with_a_reason(tmp_path):
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", FakeEncoder(), progress=False,
                             max_images=1)
    handlers = Handlers(library)
    status, _ = handlers.add_images([upload(tmp_path, solid("red"), "r.png"),
                                     upload(tmp_path, solid("blue"), "b.png")])
    assert status.startswith("1 added, 0 already in the library, 1 refused.")
    assert "the library is full (1 images)" in status


def test_a_full_library_still_classifies(tmp_path):
    library = FeatureLibrary(tmp_path / "images", tmp_path / "f.pth", FakeEncoder(), progress=False,
                             max_images=1)
    library.add(solid("red"), name="red.png")
    handlers = Handlers(library)
    probabilities, status = handlers.classify(upload(tmp_path, solid("blue"), "b.png"), "red, blue", False)
    assert max(probabilities, key=probabilities.get) == "blue"
    assert status == "Classified, but not stored: the library is full (1 images)."
    assert len(library) == 1
