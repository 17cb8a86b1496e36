"""Evaluation runs: zero-shot classification accuracy and image-to-image retrieval quality.

``evaluate_zero_shot`` and ``evaluate_retrieval`` take a model and a
:class:`~library.datasets.LabelledImages` and return result records; the ``zeroshot`` and
``retrieval`` commands print them and write the log, the JSON and the bar chart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from . import metrics
from .cli import add_model_options, model_from_args
from .datasets import EmbeddedImages, LabelledImages, embed_files, read_image_folder, read_labelled_images
from .store import check_k
from .zero_shot import LOGIT_SCALE, ZeroShotClassifier

# Labels per text-encoding call: 32 labels x 80 prompts stays inside the encoder's text cache.
LABEL_CHUNK = 32
QUERY_CHUNK = 512  # queries scored at once: bounds the [queries, targets] matrix
PER_CLASS_PRINT_LIMIT = 50  # longer per-class tables go only to the log and the JSON


@dataclass
class ClassRow:
    """One class's line of a report: its name, its number of images and its metrics."""

    name: str
    images: int
    values: dict[str, float | int]  # float metrics may be nan: no value for the class


@dataclass
class EvaluationResult:
    """What a ``zeroshot`` or ``retrieval`` run measured, ready to print or save."""

    command: str
    settings: dict
    summary: dict[str, float | int | None]
    per_class: list[ClassRow]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "command": self.command, **self.settings, **{k: _number(v) for k, v in self.summary.items()},
            "per_class": [{"class": row.name, "images": row.images,
                           **{k: _number(v) for k, v in row.values.items()}} for row in self.per_class],
            "skipped": [{"file": name, "reason": reason} for name, reason in self.skipped],
        }


class TimedEncoder:
    """Wraps an encoder and adds up the seconds spent in ``encode_pixels`` (GPU work included)."""

    def __init__(self, model):
        self.model = model
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        features = self.model.encode_pixels(pixels)
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        self.seconds += time.perf_counter() - start
        return features


# ---------------------------------------------------------------------------- zero-shot
def class_embeddings(model, classes: list[str], ensemble: bool = True,
                     progress: bool = True) -> torch.Tensor:
    """``Tensor[C, D]``: each class's prompt embedding (underscores in names read as spaces)."""
    classifier = ZeroShotClassifier(model, max_labels=max(len(classes), 1))
    prompts = [name.replace("_", " ") for name in classes]
    starts = range(0, len(prompts), LABEL_CHUNK)
    chunks = [classifier.label_embeddings(prompts[start:start + LABEL_CHUNK], ensemble).float().cpu()
              for start in tqdm(starts, desc="encoding class prompts", unit="batch",
                                disable=not progress or len(starts) < 2)]
    return torch.cat(chunks)


def evaluate_zero_shot(model, dataset: LabelledImages, *, ensemble: bool = True,
                       batch_size: int = 64, progress: bool = True) -> EvaluationResult:
    """Top-1 and top-5 accuracy of zero-shot classification over a labelled image set.

    ``ms_per_image`` is the image tower's time per image; ``images_per_second`` the
    end-to-end rate of reading, decoding and encoding.
    """
    timed = TimedEncoder(model)
    start = time.perf_counter()
    embedded = embed_files(timed, list(zip(dataset.names, dataset.paths)), batch_size=batch_size,
                           progress="embedding" if progress else None)
    seconds = time.perf_counter() - start
    count = len(embedded.names)
    _check_readable(dataset, embedded)
    labels = torch.tensor([dataset.labels[i] for i in embedded.kept])
    text = class_embeddings(model, dataset.classes, ensemble, progress)
    top1, top5 = [], []
    for begin in range(0, count, QUERY_CHUNK):
        logits = LOGIT_SCALE * embedded.features[begin:begin + QUERY_CHUNK] @ text.T
        chunk_labels = labels[begin:begin + QUERY_CHUNK]
        top1.append(metrics.top_k_accuracy(logits, chunk_labels, 1))
        top5.append(metrics.top_k_accuracy(logits, chunk_labels, 5))
    top1, top5 = torch.cat(top1).double(), torch.cat(top5).double()
    classes = len(dataset.classes)
    per_class = _class_rows(dataset.classes, labels, {
        "top1": metrics.per_class_mean(top1, labels, classes),
        "top5": metrics.per_class_mean(top5, labels, classes)})
    summary = {
        "images": count, "top1": float(top1.mean()), "top5": float(top5.mean()),
        "ms_per_image": 1000.0 * timed.seconds / count,
        "images_per_second": count / seconds if seconds > 0 else None,
        "encode_seconds": timed.seconds, "seconds": seconds,
    }
    settings = _settings(model, dataset) | {"ensemble": bool(ensemble)}
    return EvaluationResult("zeroshot", settings, summary, per_class, embedded.refused)


# ---------------------------------------------------------------------------- retrieval
def evaluate_retrieval(model, dataset: LabelledImages, k: int = 5, *,
                       distractors: list[tuple[str, Path]] | None = None, batch_size: int = 64,
                       progress: bool = True) -> EvaluationResult:
    """Every image queries all the others (itself excluded), distractors joining the targets.

    Reports precision@k, mean average precision, the mean similarity of the top ``k`` and,
    with distractors, how many of them enter each class's top ``k``.
    """
    k = check_k(k)
    embedded = embed_files(model, list(zip(dataset.names, dataset.paths)), batch_size=batch_size,
                           progress="embedding" if progress else None)
    refused = list(embedded.refused)
    extra = torch.empty(0, embedded.features.shape[1])
    if distractors:
        embedded_distractors = embed_files(model, distractors, batch_size=batch_size,
                                           progress="embedding distractors" if progress else None)
        extra = embedded_distractors.features
        refused += [(f"distractor {name}", reason) for name, reason in embedded_distractors.refused]
    count = len(embedded.names)
    _check_readable(dataset, embedded)
    labels = torch.tensor([dataset.labels[i] for i in embedded.kept], dtype=torch.long)
    targets = torch.cat([embedded.features, extra])
    target_labels = torch.cat([labels, torch.full((extra.shape[0],), metrics.DISTRACTOR)])
    if k > targets.shape[0] - 1:
        raise ValueError(f"k={k} needs at least {k + 1} readable images; there are {targets.shape[0]}")
    precision, ap, similarity, intruders = [], [], [], []
    for begin in range(0, count, QUERY_CHUNK):
        queries = embedded.features[begin:begin + QUERY_CHUNK]
        scores = queries @ targets.T
        excluded = metrics.self_excluded(queries.shape[0], targets.shape[0], offset=begin)
        query_labels = labels[begin:begin + QUERY_CHUNK]
        precision.append(metrics.precision_at_k(scores, query_labels, target_labels, k, excluded))
        ap.append(metrics.average_precision(scores, query_labels, target_labels, excluded))
        similarity.append(metrics.mean_top_k_similarity(scores, k, excluded))
        intruders.append(metrics.distractors_in_top_k(scores, target_labels, k, excluded))
    precision, ap = torch.cat(precision).double(), torch.cat(ap).double()
    similarity, intruders = torch.cat(similarity).double(), torch.cat(intruders)
    classes = len(dataset.classes)
    columns = {
        "precision_at_k": metrics.per_class_mean(precision, labels, classes),
        "average_precision": metrics.per_class_mean(ap, labels, classes),
        "mean_top_k_similarity": metrics.per_class_mean(similarity, labels, classes),
    }
    if extra.shape[0]:
        columns["distractors_in_top_k"] = metrics.per_class_sum(intruders, labels, classes)
    summary = {
        "images": count, "distractors": int(extra.shape[0]),
        "precision_at_k": float(precision.mean()),
        "map": float(ap.nanmean()) if (~ap.isnan()).any() else None,
        "mean_top_k_similarity": float(similarity.mean()),
    }
    if extra.shape[0]:
        summary["distractors_in_top_k"] = int(intruders.sum())
    settings = _settings(model, dataset) | {"k": k}
    return EvaluationResult("retrieval", settings, summary, _class_rows(dataset.classes, labels, columns),
                            refused)


# ---------------------------------------------------------------------------- reports
def format_report(result: EvaluationResult, per_class: bool = True) -> str:
    """The human-readable report: settings, the summary and a per-class table."""
    s, settings = result.summary, result.settings
    lines = [f"{result.command} on {settings['data']} ({settings['layout']} layout, "
             f"{len(result.per_class)} classes) with {settings['model']} [{settings['preprocess']}]"]
    if result.command == "zeroshot":
        lines += [f"images: {s['images']} ({len(result.skipped)} unreadable, skipped); prompts: "
                  f"{'80-template ensemble' if settings['ensemble'] else 'a photo of a {}.'}",
                  f"top-1 accuracy: {100 * s['top1']:.2f}%",
                  f"top-5 accuracy: {100 * s['top5']:.2f}%",
                  f"time: {s['ms_per_image']:.2f} ms per image in the image encoder; "
                  f"{_format(s['images_per_second'], '.1f')} images/s end to end (decoding included)"]
        headers = ("top-1", "top-5")
    else:
        k = settings["k"]
        lines += [f"images: {s['images']} queries ({len(result.skipped)} unreadable, skipped), "
                  f"{s['distractors']} distractors",
                  f"precision@{k}: {s['precision_at_k']:.4f}",
                  f"mean average precision: {_format(s['map'], '.4f')}",
                  f"mean similarity of the top {k}: {s['mean_top_k_similarity']:.4f}"]
        if "distractors_in_top_k" in s:
            lines.append(f"distractors in a top {k}: {s['distractors_in_top_k']} of "
                         f"{s['images'] * k} places")
        headers = (f"P@{k}", "AP", f"sim@{k}") + (("distractors",) if "distractors_in_top_k" in s else ())
    if per_class:
        width = max([5] + [len(row.name) for row in result.per_class])
        lines.append(f"{'class':<{width}}  {'images':>6}  " + "  ".join(f"{h:>11}" for h in headers))
        for row in result.per_class:
            cells = [_format(v, ".0f" if key == "distractors_in_top_k" else ".4f")
                     for key, v in row.values.items()]
            lines.append(f"{row.name:<{width}}  {row.images:>6}  " + "  ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def write_outputs(result: EvaluationResult, *, out: Path | None, log: Path | None,
                  plot: Path | None) -> list[Path]:
    """Write the JSON (``out``), the log (``log``, or beside ``out``) and the bar chart."""
    written = []
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    log = log or (out.with_suffix(".log") if out is not None else None)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        skipped = [f"skipped {name}: {reason}" for name, reason in result.skipped]
        log.write_text("\n".join([stamp, format_report(result), *skipped]) + "\n", encoding="utf-8")
        written.append(log)
    if plot is not None:
        from .figures import bar_chart

        key, label = (("top1", "top-1 accuracy") if result.command == "zeroshot"
                      else ("precision_at_k", f"precision@{result.settings['k']}"))
        written.append(bar_chart([row.name for row in result.per_class],
                                 [row.values[key] for row in result.per_class], plot,
                                 title=f"{result.command}: {label} per class", ylabel=label))
    return written


# ---------------------------------------------------------------------------- commands
def cmd_zeroshot(args: argparse.Namespace) -> int:
    dataset = read_labelled_images(args.data, args.labels, args.classes)
    result = evaluate_zero_shot(model_from_args(args), dataset, ensemble=not args.no_ensemble,
                                batch_size=args.batch_size)
    return _finish(args, result)


def cmd_retrieval(args: argparse.Namespace) -> int:
    dataset = read_labelled_images(args.data, args.labels, args.classes)
    distractors = read_image_folder(args.distractors) if args.distractors else None
    if args.distractors and not distractors:
        raise ValueError(f"distractor folder {args.distractors} holds no images")
    result = evaluate_retrieval(model_from_args(args), dataset, args.k, distractors=distractors,
                                batch_size=args.batch_size)
    return _finish(args, result)


def _finish(args: argparse.Namespace, result: EvaluationResult) -> int:
    for name, reason in result.skipped:
        print(f"skipped unreadable image {name}: {reason}", file=sys.stderr)
    short = len(result.per_class) <= PER_CLASS_PRINT_LIMIT
    print(format_report(result, per_class=short))
    for path in write_outputs(result, out=args.out, log=args.log, plot=args.plot):
        print(f"wrote {path}")
    return 0


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="labelled images: DIR/<class name>/*.jpg, or a flat folder with --labels")
    parser.add_argument("--labels", type=Path, default=None,
                        help="flat (ImageNet validation) layout: file of 0-based class indices, one "
                             "per image in sorted file order (or lines of 'FILE INDEX')")
    parser.add_argument("--classes", type=Path, default=None,
                        help="class names, in index order: text (one per line) or JSON")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--log", type=Path, default=None,
                        help="write the report here (default: beside --out, as .log)")
    parser.add_argument("--plot", type=Path, default=None, help="write a per-class bar chart here")


def register(commands) -> None:
    """Add the ``zeroshot`` and ``retrieval`` commands to a subparsers object."""
    zeroshot = commands.add_parser(
        "zeroshot", help="zero-shot classification accuracy on a labelled image set",
        description="Top-1 and top-5 zero-shot accuracy, with timing, on class sub-folders or the "
                    "ImageNet validation layout.")
    _add_dataset_options(zeroshot)
    zeroshot.add_argument("--no-ensemble", action="store_true",
                          help="one prompt per class ('a photo of a {}.') instead of 80 templates")
    add_model_options(zeroshot)
    zeroshot.set_defaults(run=cmd_zeroshot)

    retrieval = commands.add_parser(
        "retrieval", help="image-to-image retrieval quality on a labelled image set",
        description="Every image queries all the others: precision@k, mean average precision, "
                    "per-class mean top-k similarity, and distractors entering the top k.")
    _add_dataset_options(retrieval)
    retrieval.add_argument("--k", type=int, default=5, help="results per query (default: 5)")
    retrieval.add_argument("--distractors", type=Path, default=None,
                           help="a folder of unrelated images added to the searched set")
    add_model_options(retrieval)
    retrieval.set_defaults(run=cmd_retrieval)


def _check_readable(dataset: LabelledImages, embedded: EmbeddedImages) -> None:
    if not embedded.names:
        name, reason = embedded.refused[0]
        raise ValueError(f"none of the {len(dataset)} images in {dataset.root} could be read "
                         f"(first: {name}: {reason})")


def _class_rows(classes: list[str], labels: torch.Tensor, columns: dict[str, torch.Tensor]) -> list[ClassRow]:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return [ClassRow(name, counts[c], {key: values[c].item() for key, values in columns.items()})
            for c, name in enumerate(classes)]


def _settings(model, dataset: LabelledImages) -> dict:
    return {"data": str(dataset.root), "layout": dataset.layout, "model": model.identity,
            "preprocess": getattr(model, "preprocess_mode", "crop"), "classes": len(dataset.classes)}


def _number(value):
    """JSON has no NaN: a missing value is ``null``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _format(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)
