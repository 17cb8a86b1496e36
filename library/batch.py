"""Batch retrieval: every text against an image set, or every image against a text set.

CSV in, CSV out (read as UTF-8 with or without a BOM, written as UTF-8). Image features come
from a folder's feature library, so a second run embeds nothing new; a CSV of image paths is
embedded on each run.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .cli import add_model_options, model_from_args, open_library
from .datasets import embed_files
from .store import DEFAULT_FEATURES_NAME, check_k

TEXT2IMAGE_COLUMNS = ("text_id", "similarity_ranking", "result_image_id", "score")
IMAGE2TEXT_COLUMNS = ("image_id", "similarity_ranking", "result_text_id", "score")
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_IMAGE_COLUMN = "path"
TEXT_BATCH = 256
QUERY_CHUNK = 1024  # queries scored at once: bounds the [queries, targets] matrix


@dataclass
class Texts:
    """Texts read from a CSV, with their ids; rows with an empty text are counted, not kept."""

    ids: list[str]
    texts: list[str]
    skipped: int = 0


@dataclass
class ImageSet:
    """Image ids with their features, and the inputs refused (unreadable) or skipped."""

    ids: list[str]
    features: torch.Tensor
    refused: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    indexed: int = 0  # images embedded by this run


# ---------------------------------------------------------------------------- CSV
def read_csv(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file read as UTF-8 (an Excel BOM is dropped)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                         "as CSV UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path} is not a readable CSV file ({exc})") from None
    if not columns:
        raise ValueError(f"{path} is empty: a CSV file with a header row is needed")
    return columns, rows


def require_column(columns: list[str], name: str, path) -> str:
    """``name`` if the CSV has that column, else a ``ValueError`` listing the columns it has."""
    if name not in columns:
        raise ValueError(f"{path} has no column {name!r} (columns: {', '.join(columns)})")
    return name


def pick_column(columns: list[str], wanted: str | None, path, default: str, option: str) -> str:
    """The column to read: ``wanted``, else ``default``, else a file's only column."""
    if wanted is not None:
        return require_column(columns, wanted, path)
    if default in columns:
        return default
    if len(columns) == 1:
        return columns[0]
    raise ValueError(f"{path} has no column {default!r} (columns: {', '.join(columns)}); "
                     f"choose one with {option}")


def read_texts(path: str | os.PathLike, text_column: str | None = None,
               id_column: str | None = None) -> Texts:
    """Read texts (column ``text`` by default) and ids (the text itself without ``id_column``)."""
    columns, rows = read_csv(path)
    text_column = pick_column(columns, text_column, path, DEFAULT_TEXT_COLUMN, "--text-column")
    if id_column is not None:
        require_column(columns, id_column, path)
    result = Texts([], [])
    for row in rows:
        text = (row.get(text_column) or "").strip()
        if not text:
            result.skipped += 1
            continue
        result.texts.append(text)
        result.ids.append((row.get(id_column) or "").strip() if id_column else text)
    if not result.texts:
        raise ValueError(f"{path} has no text in column {text_column!r}")
    return result


def read_image_list(path: str | os.PathLike, image_column: str | None = None,
                    id_column: str | None = None) -> list[tuple[str, Path]]:
    """``[(image id, path), ...]`` from a CSV; relative paths are relative to the CSV's folder."""
    columns, rows = read_csv(path)
    image_column = pick_column(columns, image_column, path, DEFAULT_IMAGE_COLUMN, "--image-column")
    if id_column is not None:
        require_column(columns, id_column, path)
    base = Path(path).parent
    items = []
    for row in rows:
        written = (row.get(image_column) or "").strip()
        if written:
            image_id = (row.get(id_column) or "").strip() if id_column else written
            items.append((image_id, base / written))
    if not items:
        raise ValueError(f"{path} lists no images in column {image_column!r}")
    return items


def write_csv(path: str | os.PathLike, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Write rows as UTF-8 CSV under a header, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


# ---------------------------------------------------------------------------- ranking
def encode_texts(model, texts: list[str], batch_size: int = TEXT_BATCH,
                 progress: bool = True) -> torch.Tensor:
    """``Tensor[N, D]`` text features, encoded in batches with a progress bar."""
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="encoding texts", unit="batch", disable=not progress or len(starts) < 2):
        chunks.append(model.encode_texts(texts[start:start + batch_size]).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.dim)


def top_matches(queries: torch.Tensor, targets: torch.Tensor, k: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores[Q, k'], indices[Q, k'])``: each query's best targets by cosine similarity.

    ``k' = min(k, T)``; queries are scored in chunks so ``[Q, T]`` is never built whole.
    """
    k = min(check_k(k), targets.shape[0])
    scores, indices = [], []
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        top = (queries[start:start + QUERY_CHUNK].float() @ targets.float().T).topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    if not scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(indices)


def ranking_rows(query_ids: list[str], result_ids: list[str], scores: torch.Tensor,
                 indices: torch.Tensor) -> list[tuple]:
    """``(query id, ranking 1.., result id, score)`` rows, best first for every query."""
    rows = []
    for query_id, row_scores, row_indices in zip(query_ids, scores.tolist(), indices.tolist()):
        for rank, (score, index) in enumerate(zip(row_scores, row_indices), start=1):
            rows.append((query_id, rank, result_ids[index], f"{score:.4f}"))
    return rows


def text_to_image(model, texts: Texts, images: ImageSet, k: int, *, progress: bool = True) -> list[tuple]:
    """For every text, its ``k`` best images (rows of :data:`TEXT2IMAGE_COLUMNS`)."""
    _check_images(images)
    scores, indices = top_matches(encode_texts(model, texts.texts, progress=progress), images.features, k)
    return ranking_rows(texts.ids, images.ids, scores, indices)


def image_to_text(model, images: ImageSet, texts: Texts, k: int, *, progress: bool = True) -> list[tuple]:
    """For every image, its ``k`` best texts (rows of :data:`IMAGE2TEXT_COLUMNS`)."""
    _check_images(images)
    scores, indices = top_matches(images.features, encode_texts(model, texts.texts, progress=progress), k)
    return ranking_rows(images.ids, texts.ids, scores, indices)


def _check_images(images: ImageSet) -> None:
    if not images.ids:
        raise ValueError("no readable images to search")


# ---------------------------------------------------------------------------- image sets
def image_set(args: argparse.Namespace, model) -> ImageSet:
    """The images of ``--images``: a folder (through its feature library) or a CSV of paths."""
    source = Path(args.images)
    if source.is_file() and source.suffix.lower() == ".csv":
        items = read_image_list(source, args.image_column, args.image_id_column)
        embedded = embed_files(model, items, batch_size=args.batch_size)
        return ImageSet(embedded.names, embedded.features, embedded.refused,
                        indexed=len(embedded.names))
    if not source.is_dir():
        raise FileNotFoundError(f"--images {source}: no such folder or CSV file")
    library = open_library(args, model)
    try:
        report = library.last_sync
        return ImageSet(library.files, library.features, list(report.refused), report.duplicates,
                        report.indexed)
    finally:
        library.close()


# ---------------------------------------------------------------------------- commands
def cmd_text2image(args: argparse.Namespace) -> int:
    texts = read_texts(args.texts, args.text_column, args.id_column)
    model = model_from_args(args)
    images = image_set(args, model)
    _report_inputs(texts, images)
    rows = text_to_image(model, texts, images, args.top)
    write_csv(args.out, TEXT2IMAGE_COLUMNS, rows)
    print(f"{len(texts.texts)} texts x top {min(args.top, len(images.ids))} of "
          f"{len(images.ids)} images: {len(rows)} rows written to {args.out}")
    return 0


def cmd_image2text(args: argparse.Namespace) -> int:
    texts = read_texts(args.texts, args.text_column, args.id_column)
    model = model_from_args(args)
    images = image_set(args, model)
    _report_inputs(texts, images)
    rows = image_to_text(model, images, texts, args.top)
    write_csv(args.out, IMAGE2TEXT_COLUMNS, rows)
    print(f"{len(images.ids)} images x top {min(args.top, len(texts.texts))} of "
          f"{len(texts.texts)} texts: {len(rows)} rows written to {args.out}")
    return 0


def _report_inputs(texts: Texts, images: ImageSet) -> None:
    for name, reason in images.refused:
        print(f"skipped unreadable image {name}: {reason}", file=sys.stderr)
    if images.duplicates:
        print(f"skipped {images.duplicates} images with the same bytes as an indexed one",
              file=sys.stderr)
    if texts.skipped:
        print(f"skipped {texts.skipped} rows with an empty text", file=sys.stderr)
    print(f"{len(images.ids)} images ({images.indexed} embedded now), {len(texts.texts)} texts")


def _positive(value: str) -> int:
    try:
        return check_k(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}") from None


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--texts", required=True, type=Path, help="CSV file of texts (UTF-8)")
    parser.add_argument("--text-column", default=None,
                        help=f"column of the texts (default: {DEFAULT_TEXT_COLUMN!r}, or the only column)")
    parser.add_argument("--id-column", default=None,
                        help="column of the text ids (default: the text itself is its id)")
    parser.add_argument("--images", required=True, type=Path,
                        help="image folder, or a CSV file with a column of image paths")
    parser.add_argument("--features", type=Path, default=None,
                        help=f"feature file of an image folder (default: IMAGES/{DEFAULT_FEATURES_NAME})")
    parser.add_argument("--image-column", default=None,
                        help=f"with a CSV of images: the column of paths, relative to the CSV's "
                             f"folder (default: {DEFAULT_IMAGE_COLUMN!r}, or the only column)")
    parser.add_argument("--image-id-column", default=None,
                        help="with a CSV of images: the column of image ids (default: the path)")
    parser.add_argument("--top", type=_positive, default=5, help="results per query (default: 5)")
    parser.add_argument("--out", required=True, type=Path, help="the CSV file to write")
    add_model_options(parser)


def register(commands) -> None:
    """Add the ``text2image`` and ``image2text`` commands to a subparsers object."""
    text2image = commands.add_parser(
        "text2image", help="for every text in a CSV, the top images (CSV out)",
        description="For every text row, the most similar images. Output columns: "
                    + ", ".join(TEXT2IMAGE_COLUMNS))
    _add_common_options(text2image)
    text2image.set_defaults(run=cmd_text2image)

    image2text = commands.add_parser(
        "image2text", help="for every image, the top texts of a CSV (CSV out)",
        description="For every image, the most similar texts. Output columns: "
                    + ", ".join(IMAGE2TEXT_COLUMNS))
    _add_common_options(image2text)
    image2text.set_defaults(run=cmd_image2text)
