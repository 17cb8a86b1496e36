"""The fast paths: automatic bf16, the bf16 search matrix, the folder scan and loading."""

import os

import clip
import pytest
import torch

import library.model as model_module
from library import FeatureLibrary
from library.model import ClipEncoder, encode_tokens
from library.store import DEFAULT_FEATURES_NAME, FORMAT_VERSION
from library.testing import build_clip
from tests.conftest import FakeEncoder, distinct_image


class VectorEncoder(FakeEncoder):
    """A fake encoder of a given width: only the library's vector arithmetic is under test."""

    def __init__(self, dim):
        super().__init__(identity=f"vectors-{dim}")
        self.dim = dim


def write_state(folder, rows, identity, dim):
    """A library file holding ``rows`` (float16, as saved) for files 0000.png, 0001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [f"{i:04d}.png" for i in range(len(rows))]
    state = {"format_version": FORMAT_VERSION, "model": identity, "dim": dim,
             "features": rows.half(), "files": files, "sha256": [f"sha-{f}" for f in files]}
    torch.save(state, folder / DEFAULT_FEATURES_NAME)
    return folder / DEFAULT_FEATURES_NAME


def unit(rows):
    return rows / rows.norm(dim=-1, keepdim=True)


def open_vectors(tmp_path, rows, dtype, name="lib"):
    encoder = VectorEncoder(rows.shape[1])
    path = write_state(tmp_path / name, rows, encoder.identity, rows.shape[1])
    return FeatureLibrary(tmp_path / name, path, encoder, sync=False, progress=False, dtype=dtype)


def ranking(library, query, k=10):
    return [int(entry.file[:4]) for entry in library.search_vector(query, k)]


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(monkeypatch, supported, expected):
    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: supported)
    monkeypatch.setattr(model_module, "AUTO_BF16_MIN_PARAMS", 0)
    assert ClipEncoder(build_clip(), "tiny", device="cpu").precision == expected


def test_auto_precision_keeps_a_toy_model_exact(monkeypatch):
    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: True)
    assert ClipEncoder(build_clip(), "tiny", device="cpu").precision == "fp32"
    assert ClipEncoder(build_clip(), "tiny", device="cpu", precision="fp32").precision == "fp32"


def test_bf16_converts_weights_once_and_matches_fp32():
    reference = ClipEncoder(build_clip(seed=4), "tiny", precision="fp32")
    fast = ClipEncoder(build_clip(seed=4), "tiny", precision="bf16")
    assert fast.model.visual.conv1.weight.dtype == torch.bfloat16
    assert fast.model.visual.ln_pre.weight.dtype == torch.float32  # norms stay fp32
    images = [distinct_image(i, size=(48, 40)) for i in range(6)]
    texts = ["a cat", "a photo of a small dog on a red sofa", "x"]
    for ours, theirs in ((fast.encode_images(images), reference.encode_images(images)),
                         (fast.encode_texts(texts), reference.encode_texts(texts))):
        assert ours.dtype == torch.float32
        assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-5)
        assert (ours * theirs).sum(dim=-1).min() > 0.999


def test_text_truncation_is_exact_in_bf16_too():
    fast = ClipEncoder(build_clip(seed=3), "tiny", precision="bf16").model
    tokens = clip.tokenize(["a cat", "a photo of a small dog on a red sofa in the sun", "x"])
    with torch.no_grad():
        full, short = fast.encode_text(tokens).float(), encode_tokens(fast, tokens).float()
    assert torch.allclose(full, short, atol=2e-2, rtol=2e-2)
    assert (unit(full) * unit(short)).sum(dim=-1).min() > 0.9999


def test_cpu_bf16_check_answers_false_without_the_private_helpers(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert model_module.cpu_supports_bf16() is False


# ---------------------------------------------------------------- search matrix
def test_bf16_search_is_exact_for_the_rounded_vectors_and_matches_fp32(tmp_path):
    generator = torch.Generator().manual_seed(0)
    rows = unit(torch.randn(3000, 64, generator=generator))
    fast = open_vectors(tmp_path, rows, torch.bfloat16, "fast")
    exact = open_vectors(tmp_path, rows, torch.float32, "exact")
    assert fast._matrix.dtype == torch.bfloat16 and exact._matrix.dtype == torch.float32
    rounded = rows.half().bfloat16().float()
    overlaps = []
    for query in unit(torch.randn(40, 64, generator=generator)):
        assert ranking(fast, query) == torch.topk(rounded @ query, 10).indices.tolist()
        overlaps.append(len(set(ranking(fast, query)) & set(ranking(exact, query))))
    assert sum(overlaps) / len(overlaps) >= 9.9


def test_bf16_scan_ties_are_broken_by_float32_rescoring(tmp_path):
    # Twelve distinct rows whose scores differ by about 1e-4, far below a bf16 score's
    # resolution near 0.5 (2**-10): a bf16 scan alone would tie them.
    dim = 16
    rows = torch.zeros(12, dim)
    rows[:, 0] = 0.5
    rows[torch.arange(12), torch.arange(12) + 1] = 0.01 * torch.arange(12.0)
    rows[:, -1] = (1 - rows.square().sum(dim=1)).sqrt()  # unit rows; the query ignores this axis
    query = torch.zeros(dim)
    query[0], query[1:13] = 0.9, 0.01
    query = unit(query)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    stored = rows[order].half().bfloat16()
    assert len(set((stored @ query.bfloat16()).tolist())) < 6  # the scan's ties
    library = open_vectors(tmp_path, rows[order], torch.bfloat16)
    assert ranking(library, query, 5) == torch.topk(stored.float() @ query, 5).indices.tolist()
    scores = [entry.score for entry in library.search_vector(query, 5)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 5


def test_search_vector_accepts_any_dtype_and_leaves_out_the_excluded_row(tmp_path):
    rows = unit(torch.randn(200, 32, generator=torch.Generator().manual_seed(2)))
    library = open_vectors(tmp_path, rows, torch.bfloat16)
    query = rows[7].clone()
    assert ranking(library, query.half(), 3)[0] == 7
    assert ranking(library, query.bfloat16()[None], 3)[0] == 7
    excluded = [int(e.file[:4]) for e in library.search_vector(query, 199, exclude_sha="sha-0007.png")]
    assert 7 not in excluded and len(excluded) == 199


def test_loaded_library_has_room_to_grow_without_copying(tmp_path):
    rows = unit(torch.randn(100, FakeEncoder.dim))
    library = open_vectors(tmp_path, rows, torch.bfloat16)
    before = library._matrix.data_ptr()
    for i in range(5):
        library.add(distinct_image(i), name=f"n{i}.png")
    assert library._matrix.data_ptr() == before and len(library) == 105


def test_legacy_torch_file_format_still_loads(tmp_path):
    rows = unit(torch.randn(10, 8))
    path = write_state(tmp_path / "lib", rows, "vectors-8", 8)
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    library = FeatureLibrary(tmp_path / "lib", path, VectorEncoder(8), sync=False, progress=False)
    assert len(library) == 10 and ranking(library, rows[3], 1) == [3]


# ---------------------------------------------------------------- folder scan
def test_folder_scan_finds_what_os_walk_finds(tmp_path):
    folder = tmp_path / "images"
    for relative in ("a.jpg", "B.PNG", "notes.txt", ".hidden.jpg", "sub/c.webp", "sub/deeper/d.gif",
                     ".cache/e.jpg", "sub/.f.png", "noext"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"x")
    (folder / "elsewhere").symlink_to(tmp_path / "images" / "sub", target_is_directory=True)
    library = FeatureLibrary(folder, folder / "features.png", FakeEncoder(), sync=False, progress=False)
    library.save()  # a feature file named like an image, inside the folder

    expected = set()
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = os.path.join(root, name)
            if (os.path.splitext(name)[1].lower() in {".jpg", ".png", ".webp", ".gif"}
                    and not name.startswith(".") and path != str(library.features_path)):
                expected.add(os.path.relpath(path, folder).replace(os.sep, "/"))
    assert set(library._scan_folder()) == expected == {"a.jpg", "B.PNG", "sub/c.webp", "sub/deeper/d.gif"}
