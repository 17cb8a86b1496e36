"""Batch embedding of many images, with decoding overlapped with the model's work."""

from __future__ import annotations

import hashlib
import io
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSource, LoadedImage, read_image
from .model import ClipEncoder


@dataclass
class PreparedImage:
    """One input after decoding: its bytes, hash and pixels, or the reason it was refused."""

    name: str
    data: bytes | None = None
    sha256: str | None = None
    loaded: LoadedImage | None = None
    pixels: torch.Tensor | None = None
    error: str | None = None


def prepare_image(encoder: ClipEncoder, source: ImageSource, name: str | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode, hash and preprocess one image; a bad file gives ``error`` instead of raising."""
    try:
        loaded = read_image(source, name=name, max_pixels=max_pixels)
    except ImageLoadError as exc:
        return PreparedImage(name=exc.name, error=exc.reason)
    if loaded.data is None:  # an in-memory image is stored as PNG
        loaded = LoadedImage(loaded.image, _png_bytes(loaded), "PNG", loaded.name)
    data = loaded.data
    return PreparedImage(name=loaded.name, data=data, sha256=hashlib.sha256(data).hexdigest(),
                         loaded=loaded, pixels=encoder.preprocess(loaded.image))


def embed_stream(encoder: ClipEncoder, items: Iterable[tuple[str, ImageSource]], *,
                 batch_size: int = 64, workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: str | None = None, total: int | None = None,
                 ) -> Iterator[tuple[PreparedImage, torch.Tensor | None]]:
    """Yield ``(prepared, feature)`` for each ``(name, source)`` in order.

    Decoding and preprocessing run in ``workers`` threads, at most two batches ahead, while
    the model encodes the current batch (Pillow and torch both release the GIL). Refused
    images come out with ``feature=None`` and their ``error`` set.
    """
    bar = tqdm(total=total, desc=progress, unit="img", disable=progress is None)
    pending: deque = deque()
    batch: list[PreparedImage] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def flush():
            good = [p for p in batch if p.error is None]
            features = encoder.encode_pixels(torch.stack([p.pixels for p in good])) if good else None
            rows = iter(features) if features is not None else iter(())
            for prepared in batch:
                feature = next(rows) if prepared.error is None else None
                prepared.pixels = None  # free the tensor once encoded
                yield prepared, feature
            bar.update(len(batch))
            batch.clear()

        for name, source in items:
            pending.append(pool.submit(prepare_image, encoder, source, name, max_pixels))
            if len(pending) >= 2 * batch_size:
                batch.append(pending.popleft().result())
                if len(batch) == batch_size:
                    yield from flush()
        while pending:
            batch.append(pending.popleft().result())
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()
    bar.close()


def _png_bytes(loaded: LoadedImage) -> bytes:
    buffer = io.BytesIO()
    loaded.image.save(buffer, format="PNG")
    return buffer.getvalue()
