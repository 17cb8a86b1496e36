"""What the benchmarks share: the machine's description, the encoders, and synthetic data."""

from __future__ import annotations

import hashlib
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from library.images import IMAGE_SUFFIXES
from library.model import ClipEncoder, cpu_supports_bf16
from library.store import DEFAULT_FEATURES_NAME, FORMAT_VERSION
from library.testing import VIT_B32_SHAPE, build_clip

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
BENCH_IDENTITY = "random:ViT-B/32"
NULL_IDENTITY = "bench:null-encoder"
DIM = VIT_B32_SHAPE["embed_dim"]


def machine() -> str:
    """One paragraph: CPU model, cores, memory, bf16 support, Python and torch versions."""
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    memory = "?"
    try:
        with open("/proc/meminfo") as handle:
            kib = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"{model}, {os.cpu_count()} cores, {memory} RAM, native bf16: {cpu_supports_bf16()}; "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def vit_b32(precision: str) -> ClipEncoder:
    """ViT-B/32 with seeded random weights (real FLOPs, nothing downloaded)."""
    return ClipEncoder(build_clip(VIT_B32_SHAPE, seed=0), BENCH_IDENTITY, precision=precision)


class NullEncoder:
    """An encoder that costs nothing, so a storage benchmark measures storage alone."""

    identity = NULL_IDENTITY
    dim = DIM

    def __init__(self, seed: int = 0):
        self._generator = torch.Generator().manual_seed(seed)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.zeros(1)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        features = torch.randn(len(pixels), self.dim, generator=self._generator)
        return features / features.norm(dim=-1, keepdim=True)

    def encode_texts(self, texts) -> torch.Tensor:
        return self.encode_pixels(torch.zeros(len(texts)))


def demo_photos() -> list[Path]:
    return sorted(p for p in DEMO_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def photo_variant(photo: Image.Image, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A random crop of a real photo, maybe mirrored and re-lit, resized to ``size``."""
    photo = photo.convert("RGB")
    width, height = photo.size
    scale = rng.uniform(0.55, 1.0)
    aspect = size[0] / size[1]
    crop_w = min(width, round(width * scale))
    crop_h = min(height, round(crop_w / aspect))
    crop_w = min(crop_w, round(crop_h * aspect))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))


def make_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0) -> list[Path]:
    """``count`` distinct JPEGs (quality 90) cut from the demo photos, like Cats vs Dogs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    photos = [Image.open(p) for p in demo_photos()]
    paths = []
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        photo_variant(photos[i % len(photos)], rng, size).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def unit_rows(count: int, dim: int = DIM, seed: int = 0, clusters: int = 2000) -> torch.Tensor:
    """``Tensor[count, dim]`` float16 unit rows, clustered a little as real embeddings are."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    out = torch.empty(count, dim, dtype=torch.float16)
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        rows = centres[torch.randint(clusters, (n,), generator=generator)]
        rows += 1.5 * torch.randn(n, dim, generator=generator)
        out[start:start + n] = (rows / rows.norm(dim=1, keepdim=True)).half()
    return out


def write_library(folder: Path, count: int, identity: str, seed: int = 0,
                  placeholders: bool = False) -> tuple[Path, torch.Tensor]:
    """A feature file of ``count`` synthetic rows, in the library's own format.

    With ``placeholders`` each row's image file is written too (one byte: opening the
    library with ``sync`` lists the folder but never reads an indexed file).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = [f"{i:07d}.jpg" for i in range(count)]  # row i is file i
    features = unit_rows(count, seed=seed)
    state = {"format_version": FORMAT_VERSION, "model": identity, "dim": DIM, "features": features,
             "files": files, "sha256": [hashlib.sha256(f.encode()).hexdigest() for f in files]}
    path = folder / DEFAULT_FEATURES_NAME
    torch.save(state, path)
    if placeholders:
        for file in files:
            with open(folder / file, "wb") as handle:
                handle.write(b"\0")
    return path, features


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class Stopwatch:
    """``with Stopwatch() as w: ...`` then ``w.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
