import urllib.error
import urllib.request

import clip
import pytest
import torch
from PIL import Image

from library import ModelLoadError, load_model
from library.model import encode_tokens, pad_to_square
from library.testing import build_clip


def test_state_dict_and_torchscript_checkpoints_load_to_the_same_model(
        tiny_checkpoint, tiny_torchscript_checkpoint):
    plain = load_model(tiny_checkpoint, "cpu")
    scripted = load_model(tiny_torchscript_checkpoint, "cpu")
    texts = ["a photo of a cat", "a rocket"]
    assert torch.allclose(plain.encode_texts(texts), scripted.encode_texts(texts), atol=1e-6)
    assert plain.identity.startswith("sha256:") and len(plain.identity) == 7 + 64
    assert plain.identity != scripted.identity  # identity is the checkpoint's bytes


def test_encodings_are_float32_unit_rows(tiny_model):
    images = [Image.new("RGB", (50 + i, 40), (10 * i, 100, 200)) for i in range(5)]
    features = tiny_model.encode_images(images, batch_size=2)
    assert features.shape == (5, tiny_model.dim) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    texts = tiny_model.encode_texts(["a dog", "a cat", "a dog"])
    assert texts.shape == (3, tiny_model.dim) and texts.dtype == torch.float32
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(texts[0], texts[2])


def test_batching_does_not_change_image_embeddings(tiny_model):
    images = [Image.new("RGB", (64, 48), (i * 40, 20, 250 - i * 30)) for i in range(6)]
    assert torch.allclose(tiny_model.encode_images(images, batch_size=1),
                          tiny_model.encode_images(images, batch_size=4), atol=1e-5)


def test_text_longer_than_77_tokens_is_truncated_not_an_error(tiny_model):
    long_text = "a very long caption about a cat " * 40
    features = tiny_model.encode_texts([long_text])
    assert features.shape == (1, tiny_model.dim)
    truncated = clip.tokenize([long_text], truncate=True)
    with torch.no_grad():
        expected = tiny_model.model.encode_text(truncated).float()
    assert torch.allclose(features, expected / expected.norm(dim=-1, keepdim=True), atol=1e-5)


def test_running_text_only_to_the_last_end_token_equals_the_full_77_tokens():
    model = build_clip(seed=3)
    tokens = clip.tokenize(["a cat", "a photo of a small dog on a red sofa in the sun", "x"])
    with torch.no_grad():
        full = model.encode_text(tokens)
        short = encode_tokens(model, tokens)
    assert torch.allclose(full, short, atol=1e-5)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="neither a CLIP model name"):
        load_model("ViT-Z/99")


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="junk.pt"):
        load_model(str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelLoadError, match="does not hold CLIP weights"):
        load_model(str(wrong))


def test_offline_download_failure_names_model_cache_folder_and_option(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(ModelLoadError) as caught:
        load_model("ViT-B/32", "cpu", download_root=tmp_path / "cache")
    message = str(caught.value)
    assert "'ViT-B/32'" in message
    assert str(tmp_path / "cache" / "ViT-B-32.pt") in message
    assert "--model PATH" in message
    assert "name resolution" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_pad_mode_changes_identity_and_keeps_edges():
    wide = Image.new("RGB", (200, 50), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 50))  # a red object at the left edge
    square = pad_to_square(wide)
    assert square.size == (200, 200)
    assert square.getpixel((5, 100)) == (255, 0, 0)  # still there after padding
    assert square.getpixel((100, 5)) == tuple(round(c) for c in (25.5, 0, 229.5))  # mean colour


def test_pad_preprocess_is_recorded_in_identity(tiny_checkpoint):
    crop = load_model(tiny_checkpoint, "cpu")
    pad = load_model(tiny_checkpoint, "cpu", preprocess="pad")
    assert pad.identity == crop.identity + "+pad"
    wide = Image.new("RGB", (300, 60), (0, 0, 255))
    wide.paste((255, 255, 0), (0, 0, 40, 60))
    assert not torch.allclose(crop.encode_images([wide]), pad.encode_images([wide]))
