"""``python -m library``: index a folder, search it, and the batch and evaluation tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .images import ImageLoadError
from .model import DEFAULT_MODEL, PRECISIONS, PREPROCESS_MODES, ModelLoadError, load_model
from .store import DEFAULT_FEATURES_NAME, FeatureLibrary, LibraryError


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options every command shares: which model, where, how fast."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="CLIP model name or local checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="numeric precision of the model (default: auto)")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="crop",
                        help="crop: CLIP's centre crop; pad: pad to a square first")


def add_library_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="the image folder")
    parser.add_argument("--features", type=Path, default=None,
                        help=f"the feature file (default: IMAGES/{DEFAULT_FEATURES_NAME})")


def model_from_args(args: argparse.Namespace):
    return load_model(args.model, args.device, precision=args.precision, preprocess=args.preprocess)


def open_library(args: argparse.Namespace, model=None) -> FeatureLibrary:
    return FeatureLibrary(args.images, args.features, model or model_from_args(args),
                          batch_size=args.batch_size)


def cmd_index(args: argparse.Namespace) -> int:
    library = open_library(args)
    report = library.last_sync
    library.close()
    print(f"{args.images}: {len(library)} images in the library; {report.summary()}")
    for file, reason in report.refused:
        print(f"  refused {file}: {reason}", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    library = open_library(args)
    for entry in library.search_text(args.query, args.k):
        print(f"{entry.score:.3f}  {entry.file}")
    library.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m library", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="index a folder of images")
    add_library_options(index)
    add_model_options(index)
    index.set_defaults(run=cmd_index)

    search = commands.add_parser("search", help="search a folder by a text query")
    add_library_options(search)
    add_model_options(search)
    search.add_argument("--k", type=int, default=5, help="number of results (default: 5)")
    search.add_argument("query", help="what to look for, in English")
    search.set_defaults(run=cmd_search)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands():
    """Commands defined in their own modules (batch retrieval, evaluation, figures)."""
    from . import batch, evaluate, figures

    return [batch.register, evaluate.register, figures.register]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, LibraryError, ImageLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
