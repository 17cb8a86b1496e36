"""Result figures with matplotlib: a query beside its best matches, and per-class bar charts.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: no window, no global backend switch, safe in a server thread. matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from pathlib import Path

from PIL import Image

from .cli import add_library_options, add_model_options, model_from_args, open_library
from .images import IMAGE_SUFFIXES, load_image

THUMBNAIL = 512  # longest side drawn, in pixels: a 40-megapixel photo need not be kept whole
PANEL_INCHES = 2.4
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Arial Unicode MS")


def retrieval_figure(query: Image.Image | str, results: list[tuple[Image.Image, float, str]],
                     out: str | os.PathLike, *, query_caption: str | None = None) -> Path:
    """Draw the query at the left and the results to its right, captioned like the papers'.

    Parameters
    ----------
    query : the query image, or the query text.
    results : ``(image, score, file name)`` of each result, best first.
    out : the image file to write (its suffix picks the format: .png, .jpg, .pdf, .svg).
    query_caption : the text under the query (default: ``"query"``).
    """
    if not results:
        raise ValueError("no results to draw")
    figure, canvas = _figure((PANEL_INCHES * (len(results) + 1), PANEL_INCHES + 0.9))
    axes = figure.subplots(1, len(results) + 1, squeeze=False)[0]
    family = _font_family()
    if isinstance(query, str):
        axes[0].text(0.5, 0.5, "\n".join(textwrap.wrap(query, 18)) or " ", ha="center", va="center",
                     fontsize=12, family=family, wrap=True, transform=axes[0].transAxes,
                     bbox=dict(boxstyle="round,pad=0.6", facecolor="#f2f2f2", edgecolor="#888888"))
        axes[0].set_aspect("equal")  # a square panel, like the images'
    else:
        _show(axes[0], query)
    _caption(axes[0], query_caption or "query", family, bold=True)
    for ax, (image, score, name) in zip(axes[1:], results):
        _show(ax, image)
        _caption(ax, f"score: {score:.3f}\n{_shorten(name)}", family)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    return _save(figure, canvas, out)


def bar_chart(names: list[str], values: list[float], out: str | os.PathLike, *, title: str,
              ylabel: str) -> Path:
    """A bar per class (``nan`` bars are left empty), values between 0 and 1."""
    if not names:
        raise ValueError("no classes to draw")
    width = min(40.0, max(6.0, 0.35 * len(names) + 2))
    figure, canvas = _figure((width, 4.5))
    ax = figure.subplots()
    heights = [0.0 if value is None or math.isnan(value) else value for value in values]
    bars = ax.bar(range(len(names)), heights, color="#4C72B0")
    if len(names) <= 30:
        ax.bar_label(bars, labels=[_value_label(v) for v in values], fontsize=7, padding=2)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(names) <= 100:
        ax.set_xticks(range(len(names)), [_shorten(n, 20) for n in names], rotation=60, ha="right",
                      fontsize=8, family=_font_family())
    else:
        ax.set_xlabel(f"{len(names)} classes")
    return _save(figure, canvas, out)


# ---------------------------------------------------------------------------- command
def cmd_figure(args: argparse.Namespace) -> int:
    query = _query(args.query)
    if not args.images.is_dir():
        raise FileNotFoundError(f"image folder {args.images} does not exist")
    library = open_library(args, model_from_args(args))
    try:
        if isinstance(query, Path):
            entries = library.search_image(query, args.k)
        else:
            entries = library.search_text(query, args.k)
    finally:
        library.close()
    if not entries:
        raise ValueError(f"{args.images} has no images to show")
    results = [(load_image(entry.path), entry.score, entry.file) for entry in entries]
    shown = load_image(query) if isinstance(query, Path) else query
    caption = f"query\n{_shorten(query.name)}" if isinstance(query, Path) else "query"
    path = retrieval_figure(shown, results, args.out, query_caption=caption)
    for entry in entries:
        print(f"{entry.score:.3f}  {entry.file}")
    print(f"figure written to {path}")
    return 0


def register(commands) -> None:
    """Add the ``figure`` command to a subparsers object."""
    parser = commands.add_parser(
        "figure", help="draw a query and its k best matches into an image file",
        description="The query at the left, its k best matches to the right, each captioned "
                    "with its score and file name. --query is an image file, or else a text.")
    add_library_options(parser)
    parser.add_argument("--query", required=True, help="an image file, or a text query")
    parser.add_argument("--k", type=int, default=6, help="number of results (default: 6)")
    parser.add_argument("--out", type=Path, default=Path("result.png"),
                        help="the image file to write (default: %(default)s)")
    add_model_options(parser)
    parser.set_defaults(run=cmd_figure)


def _query(value: str) -> Path | str:
    """An existing file is an image query; a name ending like an image file must exist."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise FileNotFoundError(f"query image {value} does not exist")
    if not value.strip():
        raise ValueError("the query is empty")
    return value.strip()


# ---------------------------------------------------------------------------- drawing
def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    return figure, FigureCanvasAgg(figure)


def _save(figure, canvas, out: str | os.PathLike) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    return path


def _caption(ax, text: str, family: list[str], bold: bool = False) -> None:
    ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=9,
            family=family, fontweight="bold" if bold else "normal")


def _show(ax, image: Image.Image) -> None:
    """Draw an image centred in a square panel, so every caption sits at the same height."""
    if max(image.size) > THUMBNAIL:
        image = image.copy()
        image.thumbnail((THUMBNAIL, THUMBNAIL))
    width, height = image.size
    side = max(width, height)
    ax.imshow(image)
    ax.set_xlim(-(side - width) / 2 - 0.5, width + (side - width) / 2 - 0.5)
    ax.set_ylim(height + (side - height) / 2 - 0.5, -(side - height) / 2 - 0.5)


def _value_label(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _shorten(name: str, limit: int = 28) -> str:
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[:keep // 2] + "…" + name[-(keep - keep // 2):]


def _font_family() -> list[str]:
    """DejaVu Sans, then any installed font with Chinese glyphs (matplotlib falls back)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *[name for name in CJK_FONTS if name in installed]]
