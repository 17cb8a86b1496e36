"""Every kind of file a public demo receives: good ones decode right, bad ones say why."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from library import ImageLoadError, load_image, read_image


def encode(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_declaring(width, height):
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\x00\x01\x02garbage" * 50, "not a recognised image"),
    (b"hello, I am a text file\n" * 10, "not a recognised image"),
    (b"<!DOCTYPE html><html><body>hi</body></html>", "not a recognised image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
     "not a recognised image"),
    (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF", "not a recognised image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognised image"),
])
def test_non_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(data, name="upload.jpg")
    assert caught.value.name == "upload.jpg" and str(caught.value).startswith("upload.jpg: ")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(fmt):
    data = encode(Image.effect_noise((200, 200), 64).convert("RGB"), fmt)
    with pytest.raises(ImageLoadError, match="damaged or truncated"):
        load_image(data[: len(data) // 2], name=f"cut.{fmt.lower()}")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageLoadError, match="900000000 pixels.*decompression bomb"):
        load_image(png_declaring(30000, 30000), name="bomb.png")
    # Under Pillow's hard limit but over ours: refused by our own check, from the header.
    with pytest.raises(ImageLoadError, match="12000x10000.*decompression bomb"):
        load_image(png_declaring(12000, 10000), name="bomb.png")


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageLoadError, match="limit of 5,000"):
        load_image(data, max_pixels=5000)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_huge_real_image_is_accepted():
    data = encode(Image.new("RGB", (8000, 6000), (10, 200, 30)), "JPEG", quality=50)
    image = load_image(data)
    assert image.size == (8000, 6000) and image.mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip at the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    loaded = load_image(encode(image, "JPEG", exif=exif, quality=95))
    assert loaded.size == (20, 60)
    r, g, b = loaded.getpixel((10, 3))
    assert b > 200 and r < 60  # the left strip is now at the top


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    loaded = load_image(encode(rgba, "PNG"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (0, 0, 255)
    grey_alpha = Image.new("LA", (4, 4), (0, 0))
    assert load_image(encode(grey_alpha, "PNG")).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    loaded = load_image(encode(palette, "PNG", transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, dtype=np.uint16)
    loaded = load_image(encode(Image.fromarray(values), "PNG"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg():
    loaded = load_image(encode(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG"))
    r, g, b = loaded.getpixel((5, 5))
    assert loaded.mode == "RGB" and r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_files_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    r, g, b = load_image(data).getpixel((8, 8))
    assert r > 200 and b < 60


def test_tiff_bmp_and_one_pixel_images():
    assert load_image(encode(Image.new("RGB", (5, 7), (1, 2, 3)), "TIFF")).size == (5, 7)
    assert load_image(encode(Image.new("RGB", (5, 7), (1, 2, 3)), "BMP")).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(encode(Image.new("L", (1, 1), 200), "PNG")).getpixel((0, 0)) == (200, 200, 200)


def test_read_image_keeps_bytes_and_format(tmp_path):
    data = encode(Image.new("RGB", (5, 5)), "JPEG")
    path = tmp_path / "x.png"  # a misleading suffix: the format comes from the bytes
    path.write_bytes(data)
    loaded = read_image(path)
    assert loaded.data == data and loaded.format == "JPEG" and loaded.suffix == ".jpg"
    assert loaded.name == "x.png"


def test_missing_file_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_integer_images_with_small_values_are_not_stretched():
    values = np.array([[0, 1], [1, 0]], dtype=np.int32)
    loaded = load_image(encode(Image.fromarray(values, "I"), "TIFF"))
    assert loaded.getpixel((1, 0)) == (1, 1, 1)
