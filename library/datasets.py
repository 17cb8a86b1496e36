"""Labelled image sets on disk, and embedding a list of image files.

Two layouts are read:

* class sub-folders: ``DIR/<class name>/*.jpg`` (images may sit deeper inside a class folder);
* the ImageNet validation layout: a flat folder of images, a ground-truth file and a
  class-names file (see :func:`read_ground_truth` and :func:`read_class_names`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .embedding import embed_stream
from .images import scan_images


@dataclass
class LabelledImages:
    """Images with a class index each; ``names`` are the paths relative to ``root``."""

    root: Path
    layout: str  # "folders" or "imagenet"
    classes: list[str]
    names: list[str]
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class EmbeddedImages:
    """The images that could be read, their features, and the ones refused with the reason."""

    names: list[str]
    features: torch.Tensor
    kept: list[int]  # the input position of each row
    refused: list[tuple[str, str]] = field(default_factory=list)


def read_labelled_images(data: str | os.PathLike, ground_truth: str | os.PathLike | None = None,
                         class_names: str | os.PathLike | None = None) -> LabelledImages:
    """Read a labelled image set: class sub-folders, or a flat folder with ``ground_truth``.

    Parameters
    ----------
    data : the image folder.
    ground_truth : for the flat (ImageNet validation) layout, the file of class indices.
    class_names : a class-names file; required with ``ground_truth``, optional with class
        folders (it then names the sorted folders in order).

    Raises
    ------
    FileNotFoundError
        For a missing folder or file.
    ValueError
        For a folder with no images, or files that do not match each other.
    """
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if ground_truth is not None:
        if class_names is None:
            raise ValueError("the flat (ImageNet validation) layout needs a class-names file "
                             "(--classes FILE) as well as the ground-truth file")
        return _read_flat(root, Path(ground_truth), read_class_names(class_names))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names, paths, labels = [], [], []
    for label, folder in enumerate(folders):
        for path in _image_files(folder, recursive=True):
            names.append(path.relative_to(root).as_posix())
            paths.append(path)
            labels.append(label)
    if not names:
        raise ValueError(
            f"{root} has no class sub-folders with images (DIR/<class name>/*.jpg). For a flat "
            "folder in the ImageNet validation layout pass --labels FILE and --classes FILE.")
    classes = [f.name for f in folders]
    if class_names is not None:
        classes = read_class_names(class_names)
        if len(classes) != len(folders):
            raise ValueError(f"{class_names} names {len(classes)} classes but {root} has "
                             f"{len(folders)} class folders")
    return LabelledImages(root, "folders", classes, names, paths, labels)


def read_image_folder(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(name relative to folder, path), ...]`` of every image in a folder tree, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return [(p.relative_to(root).as_posix(), p) for p in _image_files(root, recursive=True)]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names in class-index order, from a text or JSON file.

    Text: one name per line (blank lines ignored). JSON: a list of names, or an object whose
    keys are class indices and whose values are a name or a list ending with the name (the
    ``{"0": ["n01440764", "tench"], ...}`` file of Keras).
    """
    path = Path(path)
    text = _read_text(path)
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        if isinstance(value, dict):
            try:
                value = [value[key] for key in sorted(value, key=int)]
            except ValueError:
                raise ValueError(f"{path}: the keys of a class-names object must be class "
                                 "indices (\"0\", \"1\", ...)") from None
        if not isinstance(value, list):
            raise ValueError(f"{path} must hold a list of class names or an index -> name object")
        names = [v[-1] if isinstance(v, list) and v else v for v in value]
        if not all(isinstance(name, str) and name.strip() for name in names):
            raise ValueError(f"{path}: every class name must be a non-empty string")
        names = [name.strip() for name in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} names no classes")
    return names


def read_ground_truth(path: str | os.PathLike, num_classes: int) -> list[int] | dict[str, int]:
    """Read a ground-truth file of 0-based class indices.

    One index per line gives the class of each image in sorted file-name order (a list);
    lines of ``FILE INDEX`` give the class of each named file (a dict, the ``val.txt`` form).
    """
    path = Path(path)
    lines = [line.split() for line in _read_text(path).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no class indices")
    width = len(lines[0])
    if width not in (1, 2) or any(len(parts) != width for parts in lines):
        raise ValueError(f"{path}: every line must be a class index, or a file name and a class "
                         "index, the same on every line")
    indices = []
    for number, parts in enumerate(lines, start=1):
        try:
            index = int(parts[-1])
        except ValueError:
            raise ValueError(f"{path} line {number}: {parts[-1]!r} is not a class index") from None
        if not 0 <= index < num_classes:
            raise ValueError(f"{path} line {number}: class index {index} is outside 0..{num_classes - 1} "
                             "(indices are 0-based positions in the class-names file)")
        indices.append(index)
    if width == 1:
        return indices
    return {parts[0]: index for parts, index in zip(lines, indices)}


def embed_files(model, items: list[tuple[str, Path]], *, batch_size: int = 64,
                progress: str | None = "embedding") -> EmbeddedImages:
    """Embed image files with overlapped decoding; unreadable files are refused, not fatal."""
    names, rows, kept, refused = [], [], [], []
    stream = embed_stream(model, items, batch_size=batch_size, progress=progress, total=len(items))
    # The stream is run to its end (not zipped with ``items``) so its progress bar closes.
    for position, (prepared, feature) in enumerate(stream):
        name = items[position][0]
        if feature is None:
            refused.append((name, prepared.error))
        else:
            names.append(name)
            rows.append(feature.float().cpu())
            kept.append(position)
    features = torch.stack(rows) if rows else torch.empty(0, model.dim)
    return EmbeddedImages(names, features, kept, refused)


def _read_flat(root: Path, ground_truth: Path, classes: list[str]) -> LabelledImages:
    truth = read_ground_truth(ground_truth, len(classes))
    if isinstance(truth, dict):
        missing = [name for name in truth if not (root / name).is_file()]
        if missing:
            raise ValueError(f"{ground_truth} lists {len(missing)} files that are not in {root} "
                             f"(first: {missing[0]})")
        names = sorted(truth)
        labels = [truth[name] for name in names]
    else:
        names = [p.name for p in _image_files(root, recursive=False)]
        if len(names) != len(truth):
            raise ValueError(f"{ground_truth} has {len(truth)} class indices but {root} has "
                             f"{len(names)} images; the file needs one line per image, in sorted "
                             "file-name order")
        labels = truth
    return LabelledImages(root, "imagenet", classes, names, [root / n for n in names], labels)


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    return sorted(folder / name for name in scan_images(folder, recursive))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
