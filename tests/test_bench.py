"""The benchmark's own helpers (the benchmark itself runs with ``python -m bench.run``)."""

import torch
from PIL import Image

from bench.common import NULL_IDENTITY, NullEncoder, make_jpegs, percentile, write_library
from bench.run import jpeg_bytes, query_texts, top_overlaps
from library import FeatureLibrary


def test_synthetic_library_opens_without_indexing_anything(tmp_path):
    path, features = write_library(tmp_path / "lib", 300, NULL_IDENTITY, placeholders=True)
    library = FeatureLibrary(tmp_path / "lib", path, NullEncoder(), progress=False)
    assert len(library) == 300 and library.last_sync.indexed == library.last_sync.dropped == 0
    assert torch.allclose(features.float().norm(dim=1), torch.ones(300), atol=1e-3)
    assert library.search_vector(features[123].float(), 1)[0].file == "0000123.jpg"


def test_synthetic_inputs_are_distinct_and_realistic(tmp_path):
    paths = make_jpegs(tmp_path / "jpegs", 3)
    assert [Image.open(p).size for p in paths] == [(500, 375)] * 3
    assert len({p.read_bytes() for p in paths}) == 3
    assert len({jpeg_bytes(i) for i in range(50)}) == 50
    texts = query_texts(200, seed=1)
    assert len(set(texts)) == 200


def test_overlap_and_percentile_arithmetic():
    rows = torch.eye(12)
    assert top_overlaps(rows, rows, rows[:2], rows[:2]) == [10, 10]
    assert percentile([1.0, 2.0, 3.0, 4.0, 100.0], 50) == 3.0
