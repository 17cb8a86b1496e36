"""A public demo receives every kind of file: each is accepted or refused with a reason,
and a refusal leaves the library exactly as it was."""

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import Handlers, Limits
from library import FeatureLibrary
from tests.conftest import FakeEncoder, solid
from tests.test_images import encode, png_declaring


def animated(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, **extra)


def exif_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (30, 10), (0, 200, 0)), "JPEG", exif=exif)


def palette_transparent():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((2, 2), 1)
    return encode(image, "PNG", transparency=0)


noise_jpeg = encode(Image.effect_noise((120, 120), 50).convert("RGB"), "JPEG")
noise_png = encode(Image.effect_noise((120, 120), 50).convert("RGB"), "PNG")

VALID = {
    "huge_8000x6000.jpg": lambda: encode(Image.new("RGB", (8000, 6000), (9, 99, 199)), "JPEG", quality=40),
    "cmyk.jpg": lambda: encode(Image.new("CMYK", (20, 20), (0, 200, 200, 0)), "JPEG"),
    "grey16.png": lambda: encode(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "PNG"),
    "grey_alpha.png": lambda: encode(Image.new("LA", (9, 9), (90, 128)), "PNG"),
    "palette_transparent.png": palette_transparent,
    "animated.gif": lambda: animated("GIF"),
    "animated.webp": lambda: animated("WEBP"),
    "exif_rotated.jpg": exif_rotated,
    "scan.tiff": lambda: encode(Image.new("RGB", (12, 12), (5, 5, 5)), "TIFF"),
    "one_pixel.png": lambda: encode(Image.new("RGB", (1, 1), (255, 128, 0)), "PNG"),
}
INVALID = {
    "zero_bytes.jpg": (lambda: b"", "empty"),
    "truncated.jpg": (lambda: noise_jpeg[: len(noise_jpeg) // 2], "damaged or truncated"),
    "truncated.png": (lambda: noise_png[: len(noise_png) // 2], "damaged or truncated"),
    "random_bytes.jpg": (lambda: bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)),
                         "not a recognised image"),
    "notes.txt": (lambda: b"just some text\n", "not a recognised image"),
    "page.html": (lambda: b"<html><script>alert(1)</script></html>", "not a recognised image"),
    "drawing.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>',
                    "not a recognised image"),
    "paper.pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF", "not a recognised image"),
    "bomb.png": (lambda: png_declaring(30000, 30000), "decompression bomb"),
}


@pytest.fixture
def handlers(tmp_path):
    library = FeatureLibrary(tmp_path / "images", tmp_path / "features_library.pth", FakeEncoder(),
                             progress=False)
    library.add(solid("red"), name="red.png")
    return Handlers(library, limits=Limits(max_labels=5))


def snapshot(library):
    return (list(library.files), library.features_path.read_bytes(),
            sorted((p.name, p.stat().st_size) for p in library.image_dir.iterdir()))


def write(tmp_path, name, data):
    path = tmp_path / "uploads" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_files_are_refused_with_a_reason_and_change_nothing(handlers, tmp_path, name):
    make, reason = INVALID[name]
    path = write(tmp_path, name, make())
    before = snapshot(handlers.library)
    with pytest.raises(gr.Error, match=reason):
        handlers.classify(path, "red, blue", True)
    with pytest.raises(gr.Error, match=reason):
        handlers.search_image(path, 3)
    status, _ = handlers.add_images([path])
    assert status.startswith("0 added, 0 already in the library, 1 refused.")
    assert f"refused {name}: " in status and reason in status
    assert snapshot(handlers.library) == before


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_oddities_are_accepted(handlers, tmp_path, name):
    path = write(tmp_path, name, VALID[name]())
    probabilities, status = handlers.classify(path, "red, green, blue", True)
    assert "added to the library" in status and len(probabilities) == 3
    assert len(handlers.library) == 2
    stored = handlers.library.entries()[-1]
    assert stored.path.read_bytes() == (tmp_path / "uploads" / name).read_bytes()  # kept as sent


def test_exif_rotation_and_first_frame_reach_the_model(handlers, tmp_path):
    # What the library hands to the model's preprocessing: upright, first frame.
    rotated = handlers.library.prepare(write(tmp_path, "rot.jpg", exif_rotated()))
    assert rotated.loaded.image.size == (10, 30)
    for fmt in ("GIF", "WEBP"):
        first = handlers.library.prepare(write(tmp_path, f"anim.{fmt.lower()}", animated(fmt)))
        r, g, b = first.loaded.image.getpixel((8, 8))
        assert r > 200 and b < 60


def test_very_long_labels_emoji_and_chinese(handlers, tmp_path):
    path = write(tmp_path, "blue.png", encode(solid("blue"), "PNG"))
    long_label = "blue " + "very " * 5000 + "long"
    probabilities, _ = handlers.classify(path, f"{long_label}, 🐱 cat, 红色, red", True)
    shown = long_label[:300].strip()  # cut to what CLIP can read anyway
    assert set(probabilities) == {shown, "🐱 cat", "红色", "red"}
    assert max(probabilities, key=probabilities.get) == shown
    with pytest.raises(gr.Error, match="at most 5 are allowed"):
        handlers.classify(path, "\n".join(f"label {i}" for i in range(3000)), True)
