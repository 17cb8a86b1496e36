"""The feature library: an image folder and an index-aligned tensor file of their embeddings.

On disk (``features_library.pth``, one ``torch.save`` dict)::

    format_version  int    refuses to open a file written by a newer version
    model           str    identity of the encoder; other models' vectors are never mixed in
    dim             int
    features        Tensor[N, D] float16, L2-normalised rows
    files           list[str]  row i belongs to files[i], relative to the image folder
    sha256          list[str]  hash of each image's bytes

Adds go first to an append-only journal beside it (``features_library.pth.journal``,
fsync'd, checksummed records), and the journal is folded into a new tensor file by an
atomic rewrite (temporary file, fsync, ``os.replace``). A small library is rewritten after
every add; a large one once its journal holds a twentieth of its rows, so an add never
pays for rewriting a hundred thousand rows. A crash at any point leaves the old or the new
tensor file plus a journal whose torn tail is ignored, and an image written to the folder
but not yet indexed is indexed at the next start.

In memory the features are one bf16 matrix on a CPU with native bf16 arithmetic (half the
memory of float32 and twice the speed of a scan, which is bound by memory bandwidth), float32
elsewhere. A search scans it with one matrix-vector product, then re-scores the few rows
that the scan's rounding could have misplaced in float32, so the ranking is exact for the
vectors held. Rows held in bf16 keep 8 significant bits (a relative error of at most 2**-8,
below the bf16 model's own deviation from fp32) and are saved with that precision.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per library is then on the user
    fcntl = None

from .embedding import PreparedImage, embed_stream, prepare_image
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, ImageSource, scan_images
from .model import cpu_supports_bf16

FORMAT_VERSION = 1
DEFAULT_FEATURES_NAME = "features_library.pth"
JOURNAL_SUFFIX = ".journal"
TEMP_MARKER = ".tmp-"
# Libraries up to this size are rewritten after every add (a few MB); larger ones
# let the journal grow to COMPACT_FRACTION of their rows first.
SMALL_LIBRARY_ROWS = 10_000
COMPACT_FRACTION = 0.05
# A bf16 scan rounds the query and each score to 8 significant bits (unit roundoff 2**-8):
# for unit vectors each rounding moves a score by at most 2**-8, two roundings per score and
# two scores per comparison, so every row within 4 * 2**-8 of the k-th best is re-scored in
# float32 (at most RERANK_LIMIT rows).
SCAN_MARGIN = 4 * 2.0 ** -8
RERANK_LIMIT = 4096
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # what _atomic_write names its files
_RECORD_MAGIC = b"CLJ1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of payload

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]


class LibraryError(RuntimeError):
    """A feature library that cannot be opened or changed as asked."""


class LibraryFormatError(LibraryError):
    """The tensor file is damaged, misaligned or written by a newer version."""


class ReadOnlyLibraryError(LibraryError):
    """A write was asked of a library opened read-only."""


@dataclass(frozen=True)
class Entry:
    """One library image: its stored file name, full path and (in search results) score."""

    file: str
    path: Path
    score: float | None = None


@dataclass(frozen=True)
class AddResult:
    """What :meth:`FeatureLibrary.add_many` did with one input."""

    name: str
    status: str  # "added", "duplicate" or "refused"
    entry: Entry | None = None
    reason: str | None = None


@dataclass
class SyncReport:
    """What opening the library found: images indexed, duplicates skipped, files refused."""

    indexed: int = 0
    duplicates: int = 0
    dropped: int = 0
    reembedded: bool = False
    refused: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.indexed} indexed, {self.duplicates} skipped as duplicate, "
                f"{len(self.refused)} refused as unreadable, {self.dropped} missing files dropped")


class FeatureLibrary:
    """An image folder with an index-aligned, crash-safe file of CLIP embeddings.

    Parameters
    ----------
    image_dir : the folder of images; created if missing.
    features_path : the tensor file (default: ``features_library.pth`` inside ``image_dir``).
    model : the encoder (a :class:`~library.model.ClipEncoder` or any object with
        ``identity``, ``dim``, ``preprocess``, ``encode_pixels`` and ``encode_texts``).
    read_only : never write to disk; new images are indexed in memory only.
    sync : index unindexed images and drop vanished ones now (see :meth:`sync`).
    max_images : adds beyond this many images are refused (a quota for a public app).
    dtype : the in-memory feature dtype; default :func:`default_feature_dtype`.
    """

    def __init__(self, image_dir: str | os.PathLike, features_path: str | os.PathLike | None = None,
                 model=None, *, read_only: bool = False, sync: bool = True, progress: bool = True,
                 batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_images: int | None = None, dtype: torch.dtype | None = None):
        if model is None:
            raise ValueError("FeatureLibrary needs a model (see library.load_model)")
        self.image_dir = Path(image_dir).resolve()
        self.features_path = Path(features_path or self.image_dir / DEFAULT_FEATURES_NAME).resolve()
        self.journal_path = self.features_path.with_name(self.features_path.name + JOURNAL_SUFFIX)
        self.model = model
        self.read_only = read_only
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.max_images = max_images
        self._lock = threading.RLock()
        self._files: list[str] = []
        self._sha: list[str] = []
        self._dtype = dtype or default_feature_dtype()
        self._matrix = torch.empty(0, model.dim, dtype=self._dtype)
        self._count = 0
        self._row_of_sha: dict[str, int] = {}
        self._row_of_file: dict[str, int] = {}
        self._journal = None
        self._journal_rows = 0
        self._journal_dirty = False
        if read_only and not self.image_dir.is_dir():
            raise LibraryError(f"image folder {self.image_dir} does not exist")
        self._holds_writer_lock = False
        if not read_only:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            self.features_path.parent.mkdir(parents=True, exist_ok=True)
            _writer_locks.acquire(self.features_path)
            self._holds_writer_lock = True
            self._remove_temporary_files()
        self._stored_identity = self._load()
        self.last_sync = self.sync(progress=progress) if sync else SyncReport()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    def __contains__(self, file: str) -> bool:
        return file in self._row_of_file

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __repr__(self) -> str:
        return f"FeatureLibrary({str(self.image_dir)!r}, {len(self)} images, model={self.model.identity!r})"

    @property
    def files(self) -> list[str]:
        """The stored file names, in row order."""
        with self._lock:
            return self._files[:self._count]

    @property
    def features(self) -> torch.Tensor:
        """A float32 copy of the feature matrix ``Tensor[N, D]``, row i for ``files[i]``."""
        with self._lock:
            return self._matrix[:self._count].float().clone()

    def entries(self, offset: int = 0, limit: int | None = None) -> list[Entry]:
        """Library images in row order, ``limit`` of them from ``offset`` (for paging)."""
        with self._lock:
            end = self._count if limit is None else min(self._count, offset + limit)
            return [self._entry(f) for f in self._files[max(0, offset):end]]

    def entry(self, file: str) -> Entry:
        if file not in self._row_of_file:
            raise KeyError(f"{file!r} is not in the library")
        return self._entry(file)

    def feature(self, file: str) -> torch.Tensor:
        """The stored float32 embedding of one library image."""
        with self._lock:
            if file not in self._row_of_file:
                raise KeyError(f"{file!r} is not in the library")
            return self._matrix[self._row_of_file[file]].float().clone()

    def search_text(self, query: str, k: int = 5) -> list[Entry]:
        """The ``k`` images that best match an English text query, best first."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the search query is empty")
        k = check_k(k)
        return self.search_vector(self.model.encode_texts([query.strip()])[0], k)

    def search_image(self, image: ImageSource, k: int = 5, *, exclude_self: bool = True,
                     name: str | None = None) -> list[Entry]:
        """The ``k`` library images most similar to ``image``; the image itself is left out."""
        k = check_k(k)
        prepared, feature = self.embed(image, name)
        return self.search_vector(feature, k, exclude_sha=prepared.sha256 if exclude_self else None)

    def embed(self, image: ImageSource, name: str | None = None) -> tuple[PreparedImage, torch.Tensor]:
        """Decode, hash and embed an image without storing it (its bytes and hash come along)."""
        prepared = self.prepare(image, name)
        return prepared, self.model.encode_pixels(prepared.pixels[None])[0]

    def search_vector(self, vector: torch.Tensor, k: int, *, exclude_sha: str | None = None) -> list[Entry]:
        """Rank the library by cosine similarity with an L2-normalised vector."""
        k = check_k(k)
        with self._lock:  # a consistent view: appends never touch rows below count
            count, matrix, files = self._count, self._matrix, self._files
            excluded = self._row_of_sha.get(exclude_sha) if exclude_sha else None
        if count == 0:
            return []
        vector = vector.detach().to("cpu", torch.float32).flatten()
        scores = (matrix[:count] @ vector.to(matrix.dtype)).float()
        if excluded is not None:
            scores[excluded] = float("-inf")
        k = min(k, count - (excluded is not None))
        if k <= 0:
            return []
        if matrix.dtype == torch.float32:
            top = torch.topk(scores, k)
            values, rows = top.values.tolist(), top.indices.tolist()
        else:
            values, rows = _rescore(matrix, scores, vector, k)
        return [self._entry(files[i], s) for s, i in zip(values, rows)]

    # ------------------------------------------------------------------ writing
    def add(self, image: ImageSource, name: str | None = None) -> Entry:
        """Add one image; an image already present returns its existing entry.

        Raises :class:`~library.images.ImageLoadError` for a file that is not a usable image.
        """
        result = self.add_many([(name, image)])[0]
        if result.status == "refused":
            raise ImageLoadError(result.name, result.reason)
        return result.entry

    def add_many(self, images: Iterable[ImageSource | tuple[str | None, ImageSource]], *,
                 progress: ProgressCallback | None = None, total: int | None = None) -> list[AddResult]:
        """Add several images in batches; each gets an :class:`AddResult`, refusals included.

        Every image reported ``added`` is on disk and in the journal (fsync'd) when this returns.
        """
        self._check_writable()
        items = [item if isinstance(item, tuple) else (None, item) for item in images]
        total = total or len(items)
        results: list[AddResult] = []
        try:
            stream = embed_stream(self.model, items, batch_size=self.batch_size,
                                  max_pixels=self.max_pixels)
            for prepared, feature in stream:
                results.append(self._store(prepared, feature))
                if progress:
                    progress(len(results), total)
        finally:
            self._flush_journal()
            with self._lock:
                self._maybe_compact()
        return results

    def remove(self, file: str) -> None:
        """Remove an image and its row; the tensor file is rewritten at once."""
        self._check_writable()
        with self._lock:
            row = self._row_of_file.get(file)
            if row is None:
                raise KeyError(f"{file!r} is not in the library")
            # The file goes first: after a crash, a row without its file is dropped at the next
            # start, while a file without its row would be indexed again.
            (self.image_dir / file).unlink(missing_ok=True)
            keep = [i for i in range(self._count) if i != row]
            self._replace_rows([self._files[i] for i in keep], [self._sha[i] for i in keep],
                               self._matrix[keep])
            self.save()

    def sync(self, progress: bool = True) -> SyncReport:
        """Drop rows whose image is gone; embed images not yet indexed ("first sight").

        If the tensor file was made by another model, every image is embedded again.
        """
        report = SyncReport()
        with self._lock:
            on_disk = set(self._scan_folder())
            if self._stored_identity not in (None, self.model.identity):
                # _load kept none of its rows: every image is embedded again below.
                log.warning("%s was made with %s; re-embedding every image with %s",
                            self.features_path.name, self._stored_identity, self.model.identity)
                report.reembedded = True
            keep = [i for i in range(self._count) if self._files[i] in on_disk]
            report.dropped = self._count - len(keep)
            if report.dropped:
                self._replace_rows([self._files[i] for i in keep], [self._sha[i] for i in keep],
                                   self._matrix[keep])
            new_files = sorted(on_disk - self._row_of_file.keys())
            stream = embed_stream(self.model, [(f, self.image_dir / f) for f in new_files],
                                  batch_size=self.batch_size, max_pixels=self.max_pixels,
                                  progress="indexing" if progress and new_files else None,
                                  total=len(new_files))
            for (prepared, feature), file in zip(stream, new_files):
                if feature is None:
                    report.refused.append((file, prepared.error))
                elif prepared.sha256 in self._row_of_sha:
                    report.duplicates += 1
                else:
                    self._append(file, prepared.sha256, feature)
                    report.indexed += 1
            changed = report.indexed or report.dropped or report.reembedded or self._journal_rows
            if changed and not self.read_only:
                self.save()
            self._stored_identity = self.model.identity
        return report

    def save(self) -> None:
        """Write the whole library atomically and empty the journal."""
        self._check_writable()
        with self._lock:
            count = self._count
            state = {
                "format_version": FORMAT_VERSION,
                "model": self.model.identity,
                "dim": int(self.model.dim),
                "features": self._matrix[:count].to(torch.float16).contiguous(),
                "files": list(self._files[:count]),
                "sha256": list(self._sha[:count]),
            }
            _atomic_write(self.features_path, lambda handle: torch.save(state, handle))
            self._reset_journal()

    def close(self) -> None:
        """Fold the journal into the tensor file and release it."""
        with self._lock:
            if not self.read_only and self._journal_rows:
                self.save()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if self._holds_writer_lock:
                _writer_locks.release(self.features_path)
                self._holds_writer_lock = False

    def __enter__(self) -> FeatureLibrary:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _entry(self, file: str, score: float | None = None) -> Entry:
        return Entry(file, self.image_dir / file, score)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyLibraryError("the library is read-only; nothing is stored")

    def prepare(self, image: ImageSource, name: str | None = None) -> PreparedImage:
        """Decode, hash and preprocess an image with this library's model and pixel limit."""
        prepared = prepare_image(self.model, image, name, self.max_pixels)
        if prepared.error:
            raise ImageLoadError(prepared.name, prepared.error)
        return prepared

    def _store(self, prepared: PreparedImage, feature: torch.Tensor | None) -> AddResult:
        if feature is None:
            return AddResult(prepared.name, "refused", reason=prepared.error)
        with self._lock:
            row = self._row_of_sha.get(prepared.sha256)
            if row is not None:
                return AddResult(prepared.name, "duplicate", self._entry(self._files[row]))
            if self.max_images is not None and self._count >= self.max_images:
                return AddResult(prepared.name, "refused",
                                 reason=f"the library is full ({self.max_images:,} images)")
            try:
                file = self._write_image(prepared)
            except (OSError, LibraryError) as exc:  # e.g. a full disk: this image only
                return AddResult(prepared.name, "refused", reason=f"could not be stored ({exc})")
            self._append(file, prepared.sha256, feature)
            self._journal_append(file, prepared.sha256, feature)
            return AddResult(prepared.name, "added", self._entry(file))

    def _write_image(self, prepared: PreparedImage) -> str:
        """Write the image bytes under a name made from their hash, never from the client."""
        stem = _safe_stem(prepared.name)
        suffix = prepared.loaded.suffix
        for length in (12, 64):
            file = f"{prepared.sha256[:length]}{'-' + stem if stem else ''}{suffix}"
            target = self.image_dir / file
            if not target.exists():
                _atomic_write(target, lambda handle: handle.write(prepared.data))
                return file
            if target.read_bytes() == prepared.data:  # written before a crash, never indexed
                return file
        raise LibraryError(f"cannot store {prepared.name}: {target.name} exists with other content")

    def _append(self, file: str, sha256: str, feature: torch.Tensor) -> None:
        if self._count == self._matrix.shape[0]:  # grow by doubling: adds stay O(1)
            grown = torch.empty(_capacity(2 * self._count), self.model.dim, dtype=self._matrix.dtype)
            grown[:self._count] = self._matrix[:self._count]
            self._matrix = grown
        # Rounded through float16, the file's dtype, so a row is the same whether it was just
        # embedded or read back from disk.
        self._matrix[self._count] = feature.to(torch.float16).to(self._matrix.dtype)
        self._files.append(file)
        self._sha.append(sha256)
        self._row_of_file[file] = self._count
        self._row_of_sha[sha256] = self._count
        self._count += 1

    def _replace_rows(self, files: list[str], shas: list[str], matrix: torch.Tensor) -> None:
        # New objects rather than in-place edits, so a search holding the old ones stays valid.
        # Some room is left at the end, so the next adds do not copy the whole matrix.
        self._files, self._sha = list(files), list(shas)
        self._matrix = torch.empty(_capacity(len(files)), self.model.dim, dtype=self._dtype)
        self._matrix[:len(files)] = matrix
        self._count = len(files)
        self._row_of_file = {f: i for i, f in enumerate(files)}
        self._row_of_sha = {s: i for i, s in enumerate(shas)}

    def _scan_folder(self) -> Iterator[str]:
        """The images under the folder, less the feature file should it be named like one."""
        try:
            features = self.features_path.relative_to(self.image_dir).as_posix()
        except ValueError:
            features = None
        return (name for name in scan_images(self.image_dir) if name != features)

    def _remove_temporary_files(self) -> None:
        """Delete what an interrupted :func:`_atomic_write` left: its names, and only those."""
        leftovers = [p for p in self.image_dir.glob(f".*{TEMP_MARKER}*") if _TEMP_NAME.match(p.name)]
        leftovers += self.features_path.parent.glob(f".{self.features_path.name}{TEMP_MARKER}*")
        for path in leftovers:
            if path.is_file() and _TEMP_NAME.match(path.name):
                path.unlink()

    def _load(self) -> str | None:
        """Read the tensor file and replay the journal; return the tensor file's model identity.

        Rows made by another model (or of another size) are not loaded: :meth:`sync` embeds
        those images again rather than mixing two models' vectors.
        """
        identity = None
        if self.features_path.exists():
            state = _read_state(self.features_path)
            identity = state["model"]
            if identity == self.model.identity and state["features"].shape[1] == self.model.dim:
                self._replace_rows(state["files"], state["sha256"], state["features"])
        records, good_length, torn = _read_journal(self.journal_path, self.model.dim)
        for record, feature in records:
            self._journal_rows += 1
            if (record["model"] == self.model.identity and record["sha256"] not in self._row_of_sha
                    and record["file"] not in self._row_of_file):
                self._append(record["file"], record["sha256"], feature)
        if torn and not self.read_only:
            # Cut the torn tail off, or every record appended after it would be unreadable.
            with open(self.journal_path, "r+b") as handle:
                handle.truncate(good_length)
                os.fsync(handle.fileno())
        return identity

    def _journal_append(self, file: str, sha256: str, feature: torch.Tensor) -> None:
        if self._journal is None:
            self._journal = open(self.journal_path, "ab")
        head = json.dumps({"model": self.model.identity, "file": file, "sha256": sha256}).encode()
        payload = struct.pack("<I", len(head)) + head + feature.to(torch.float32).numpy().tobytes()
        self._journal.write(_RECORD_HEAD.pack(_RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload)
        self._journal_rows += 1
        self._journal_dirty = True

    def _flush_journal(self) -> None:
        with self._lock:
            if self._journal is not None and self._journal_dirty:
                self._journal.flush()
                os.fsync(self._journal.fileno())
                self._journal_dirty = False

    def _reset_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.journal_path.exists():
            self.journal_path.unlink()
            _fsync_dir(self.journal_path.parent)
        self._journal_rows = 0

    def _maybe_compact(self) -> None:
        if not self._journal_rows:
            return
        if self._count <= SMALL_LIBRARY_ROWS or self._journal_rows >= COMPACT_FRACTION * self._count:
            try:
                self.save()
            except OSError as exc:  # the journal still holds every add: nothing is lost
                log.warning("could not rewrite %s (%s); the journal keeps the new rows",
                            self.features_path, exc)


def default_feature_dtype() -> torch.dtype:
    """bf16 where the CPU has native bf16 arithmetic (a scan is twice as fast), else float32."""
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def _capacity(rows: int) -> int:
    return max(64, rows + rows // 8)


def _rescore(matrix: torch.Tensor, scores: torch.Tensor, vector: torch.Tensor,
             k: int) -> tuple[list[float], list[int]]:
    """The exact top ``k``: rows whose scanned score is near the k-th best, scored in float32."""
    threshold = float(torch.topk(scores, k).values[-1]) - SCAN_MARGIN * max(1.0, float(vector.norm()))
    rows = torch.nonzero(scores >= threshold).flatten()
    if len(rows) > RERANK_LIMIT:
        rows = torch.topk(scores, RERANK_LIMIT).indices
    exact = matrix[rows].float() @ vector
    top = torch.topk(exact, min(k, len(rows)))
    return top.values.tolist(), rows[top.indices].tolist()


class _WriterLocks:
    """One writing process per library: an advisory ``flock`` on ``<features>.lock``.

    Instances in the same process share the lock (counted), so a process may reopen its own
    library; a second process that opens it for writing gets a clear error instead of two
    journals interleaving. The kernel drops the lock when a process dies, even by SIGKILL.
    """

    def __init__(self):
        self._held: dict[Path, list] = {}  # features path -> [open lock file, count]
        self._guard = threading.Lock()

    def acquire(self, features_path: Path) -> None:
        with self._guard:
            if features_path in self._held:
                self._held[features_path][1] += 1
                return
            handle = open(features_path.with_name(features_path.name + ".lock"), "a+b")
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    raise LibraryError(
                        f"{features_path} is open for writing in another process (an app or "
                        "an index command): stop it first, or open the library read-only") from None
            self._held[features_path] = [handle, 1]

    def release(self, features_path: Path) -> None:
        with self._guard:
            held = self._held.get(features_path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                held[0].close()  # releases the flock
                del self._held[features_path]


_writer_locks = _WriterLocks()


def check_k(k) -> int:
    """Validate a result count: a whole number of at least 1."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < 1:
        raise ValueError(f"k must be a whole number of at least 1, not {k!r}")
    return int(k)


def _safe_stem(name: str | None) -> str:
    stem = Path(name or "").stem
    return re.sub(r"[^A-Za-z0-9_]+", "-", stem).strip("-_")[:40].lower()


def _read_state(path: Path) -> dict:
    try:
        try:  # memory-mapped: the features are read once, into the in-memory matrix
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, TypeError):  # legacy format, or a torch without mmap: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LibraryFormatError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}). Move it away to rebuild "
            "the library from the images.") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise LibraryFormatError(f"{path} is not a feature library file")
    version = state["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LibraryFormatError(
            f"{path} was written by a newer version of this project (format {version}; this "
            f"code reads up to {FORMAT_VERSION}). Upgrade the project to open it.")
    features, files, shas = state.get("features"), state.get("files"), state.get("sha256")
    if (not isinstance(features, torch.Tensor) or features.dim() != 2 or not isinstance(files, list)
            or not isinstance(shas, list) or not (len(files) == len(shas) == features.shape[0])
            or len(set(files)) != len(files)):
        raise LibraryFormatError(
            f"{path} is damaged: its features, files and hashes are not aligned. Move it away "
            "to rebuild the library from the images.")
    return state


def _read_journal(path: Path, dim: int) -> tuple[list[tuple[dict, torch.Tensor]], int, bool]:
    """The journal's complete records, the byte length they fill, and whether a torn or
    corrupt tail follows them (a crash in the middle of an append)."""
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        if offset + _RECORD_HEAD.size > len(data):
            break
        magic, length, crc = _RECORD_HEAD.unpack_from(data, offset)
        payload = data[offset + _RECORD_HEAD.size: offset + _RECORD_HEAD.size + length]
        if magic != _RECORD_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            break
        (head_length,) = struct.unpack_from("<I", payload)
        record = json.loads(payload[4:4 + head_length])
        feature = torch.frombuffer(bytearray(payload[4 + head_length:]), dtype=torch.float32)
        if feature.numel() == dim:
            records.append((record, feature))
        offset += _RECORD_HEAD.size + length
    if offset < len(data):
        log.warning("ignoring a torn record at byte %d of %s", offset, path.name)
    return records, offset, offset < len(data)


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file, fsync, then ``os.replace``: old or new, never torn."""
    temporary = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")  # see _TEMP_NAME
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
