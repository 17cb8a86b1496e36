"""Gradio app: zero-shot classification, text and image search, and a gallery over a CLIP library.

UI only: the work is done by ``library``. ``build_demo`` wires the handlers of a
:class:`Handlers` object into a ``gr.Blocks``; ``main`` reads the options, loads the model
once, opens the library and launches.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from library import (
    FeatureLibrary,
    ImageLoadError,
    LibraryError,
    ModelLoadError,
    ZeroShotClassifier,
    load_model,
    parse_labels,
)
from library.images import DEFAULT_MAX_PIXELS
from library.model import DEFAULT_MODEL, PRECISIONS, PREPROCESS_MODES

DEFAULT_LABELS = ("cat, dog, cup of coffee, rocket, astronaut, flower, motorcycle, palace, "
                  "galaxy, coins")
CAPTION_SEPARATOR = " · "


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and how large the library may grow.

    The first six are options of ``app.py`` (``--max-upload-mb`` ...); the rest are fixed.
    """

    max_upload_mb: int = 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_labels: int = 64
    max_k: int = 50
    max_files_per_add: int = 100
    max_library_images: int = 100_000
    # CLIP reads 77 tokens; these caps keep a huge paste cheap to parse.
    max_query_chars: int = 1000
    max_label_text_chars: int = 200_000
    gallery_page_size: int = 60


def uploaded_image(**kwargs) -> gr.Image:
    """A ``gr.Image`` whose handler gets the uploaded file untouched.

    gr.Image's own preprocessing opens every upload with Pillow before our handler runs, so a
    non-image or a decompression bomb would end in a bare "Error". Passing the file through lets
    ``library.images`` refuse it with a message, and keeps the original bytes for de-duplication.
    (An instance attribute rather than a subclass: gradio writes a .pyi file for every
    component subclass it sees.)
    """
    component = gr.Image(type="filepath", sources=["upload", "clipboard"], **kwargs)
    default_preprocess = component.preprocess

    def pass_through(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return default_preprocess(payload)

    component.preprocess = pass_through
    return component


class Handlers:
    """The app's event handlers as plain functions over a library (tests call them directly)."""

    def __init__(self, library: FeatureLibrary, classifier: ZeroShotClassifier | None = None, *,
                 read_only: bool = False, limits: Limits = Limits()):
        self.library = library
        self.classifier = classifier or ZeroShotClassifier(library.model, max_labels=limits.max_labels)
        self.read_only = read_only or library.read_only
        self.limits = limits

    # -- Classify
    def classify(self, image: str | None, labels: str, ensemble: bool = True):
        """Top-5 label probabilities for ``gr.Label``, and a sentence on what happened to the image."""
        if not image:
            raise gr.Error("Upload an image to classify.")
        try:
            label_list = parse_labels(str(labels or "")[: self.limits.max_label_text_chars],
                                      self.limits.max_labels)
            stored = None if self.read_only else self.library.add_many([image])[0]
            if stored is not None and stored.entry is not None:
                feature = self.library.feature(stored.entry.file)
            else:  # read-only, or not stored (a bad image raises here with its reason)
                feature = self.library.embed(image)[1]
            ranked = self.classifier.classify(feature, label_list, ensemble=bool(ensemble))
        except (ImageLoadError, ValueError, LibraryError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        if stored is None:
            status = "Read-only mode: the image was classified but not stored."
        elif stored.status == "refused":
            status = f"Classified, but not stored: {stored.reason}."
        elif stored.status == "added":
            status = f"New image: added to the library as **{stored.entry.file}**."
        else:
            status = f"Already in the library as **{stored.entry.file}**; nothing was added."
        return {label: probability for label, probability in ranked[:5]}, status

    # -- Search
    def search_text(self, query: str, k=6):
        """Gallery items ``(path, "score · file")``, best first, for an English text query."""
        k = self._parse_k(k)
        query = str(query or "")[: self.limits.max_query_chars].strip()
        if not query:
            raise gr.Error("Type something to search for.")
        return self._gallery_items(self.library.search_text(query, k))

    def search_image(self, image: str | None, k=6):
        """Gallery items of the library images most similar to an upload (itself excluded)."""
        k = self._parse_k(k)
        if not image:
            raise gr.Error("Upload an image to search with.")
        try:
            return self._gallery_items(self.library.search_image(image, k))
        except ImageLoadError as exc:
            raise gr.Error(str(exc)) from None

    # -- Gallery
    def add_images(self, files: list | None, progress=gr.Progress()):  # noqa: B008 (gradio idiom)
        """Add uploaded files; returns a report and the first gallery page (newest first)."""
        if self.read_only:
            raise gr.Error("This app is read-only: uploads are not stored.")
        paths = [getattr(f, "name", f) for f in (files or [])]
        if not paths:
            raise gr.Error("Choose one or more image files to add.")
        if len(paths) > self.limits.max_files_per_add:
            raise gr.Error(f"{len(paths)} files given; at most {self.limits.max_files_per_add} "
                           "can be added at once.")
        progress(0, desc="Adding images")
        try:
            results = self.library.add_many(
                [(Path(p).name, p) for p in paths],
                progress=lambda done, total: progress(done / total, desc=f"Adding images {done}/{total}"))
        except (LibraryError, OSError) as exc:
            raise gr.Error(f"The images could not be stored: {exc}") from None
        counts = {status: sum(r.status == status for r in results)
                  for status in ("added", "duplicate", "refused")}
        lines = [f"{counts['added']} added, {counts['duplicate']} already in the library, "
                 f"{counts['refused']} refused."]
        lines += [f"- refused {r.name}: {r.reason}" for r in results if r.status == "refused"]
        return "\n".join(lines), self.gallery(1)

    def gallery(self, page=1):
        """One page of the library, newest first, as gallery items ``(path, file)``."""
        page, _ = self.clamp_page(page)
        size = self.limits.gallery_page_size
        end = len(self.library) - (page - 1) * size
        start = max(0, end - size)
        return [(str(e.path), e.file) for e in self.library.entries(start, end - start)[::-1]]

    def gallery_title(self, page=1) -> str:
        page, pages = self.clamp_page(page)
        return f"**{len(self.library)} images** in the library, page {page} of {pages} (newest first)"

    def clamp_page(self, page) -> tuple[int, int]:
        """``(page, pages)``: the page number kept within 1..pages, 1 for nonsense."""
        pages = max(1, math.ceil(len(self.library) / self.limits.gallery_page_size))
        try:
            return min(max(1, int(float(page))), pages), pages
        except (TypeError, ValueError, OverflowError):
            return 1, pages

    # -- helpers
    def _parse_k(self, k) -> int:
        try:
            value = float(k)
        except (TypeError, ValueError):
            raise gr.Error(f"k must be a number from 1 to {self.limits.max_k}, not {k!r}.") from None
        if not math.isfinite(value) or value < 1:
            raise gr.Error(f"k must be a number from 1 to {self.limits.max_k}, not {k!r}.")
        return min(int(value), self.limits.max_k)

    @staticmethod
    def _gallery_items(entries):
        return [(str(e.path), f"{e.score:.3f}{CAPTION_SEPARATOR}{e.file}") for e in entries]


def build_demo(library: FeatureLibrary, classifier: ZeroShotClassifier | None = None, *,
               read_only: bool = False, limits: Limits = Limits()) -> gr.Blocks:
    """The app's interface over ``library``; launching is left to the caller."""
    handlers = Handlers(library, classifier, read_only=read_only, limits=limits)
    # Library files are never rewritten (uploads get names from their hash; a changed file
    # dropped into the folder is a new name or a re-index), so gradio may serve them in place
    # instead of hashing and copying every result into its cache.
    gr.set_static_paths([library.image_dir])
    k_slider = dict(minimum=1, maximum=limits.max_k, value=6, step=1, label="Number of results (k)")
    # delete_cache: gradio's copies of uploads are removed after an hour.
    with gr.Blocks(title="CLIP image understanding", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# CLIP image understanding\nZero-shot classification and search over "
                    f"a library of **{len(library)}** images with OpenAI's CLIP "
                    f"(`{_short_identity(library.model.identity)}`)."
                    + ("\n\n*Read-only: uploads are classified and searched, never stored.*"
                       if handlers.read_only else ""))
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    classify_image = uploaded_image(label="Image")
                    labels = gr.Textbox(DEFAULT_LABELS, lines=3, label="Labels (comma or newline separated)")
                    ensemble = gr.Checkbox(True, label="Prompt ensemble (80 ImageNet templates)")
                    classify_button = gr.Button("Classify", variant="primary")
                with gr.Column():
                    label_output = gr.Label(num_top_classes=5, label="Probabilities")
                    classify_status = gr.Markdown()
            status_state = gr.State("")
            classify_button.click(handlers.classify, [classify_image, labels, ensemble],
                                  [label_output, status_state], api_name="classify").then(
                lambda status: status, status_state, classify_status, api_visibility="private")
        with gr.Tab("Text search"):
            with gr.Row():
                query = gr.Textbox(label="Query (English)", placeholder="a cup of coffee", scale=4)
                text_k = gr.Slider(**k_slider)
            text_button = gr.Button("Search", variant="primary")
            text_results = gr.Gallery(label="Results", columns=6, height="auto")
            gr.on([text_button.click, query.submit], handlers.search_text, [query, text_k],
                  text_results, api_name="search_text")
        with gr.Tab("Image search"):
            with gr.Row():
                with gr.Column(scale=1):
                    search_image = uploaded_image(label="Query image")
                    image_k = gr.Slider(**k_slider)
                    image_button = gr.Button("Search", variant="primary")
                with gr.Column(scale=3):
                    image_results = gr.Gallery(label="Most similar", columns=5, height="auto")
            image_button.click(handlers.search_image, [search_image, image_k], image_results,
                               api_name="search_image")
        with gr.Tab("Gallery"):
            with gr.Row():
                previous_page = gr.Button("◀ Newer")
                page = gr.Number(1, precision=0, minimum=1, label="Page")
                next_page = gr.Button("Older ▶")
            gallery_title = gr.Markdown()
            library_gallery = gr.Gallery(label="Library", columns=6, height="auto")
            with gr.Group(visible=not handlers.read_only):
                # No file_types filter: our loader reports each refused file with its reason.
                uploads = gr.File(file_count="multiple", label="Add images")
                add_button = gr.Button("Add to library", variant="primary")
                add_status = gr.Markdown()
            show_title = dict(fn=handlers.gallery_title, inputs=page, outputs=gallery_title,
                              api_visibility="private")
            add_button.click(handlers.add_images, uploads, [add_status, library_gallery],
                             api_name="add_images").then(lambda: 1, None, page,
                                                         api_visibility="private").then(**show_title)
            page.submit(handlers.gallery, page, library_gallery, api_name="gallery").then(**show_title)
            for button, step in ((previous_page, -1), (next_page, 1)):
                button.click(lambda p, step=step: handlers.clamp_page((p or 1) + step)[0], page, page,
                             api_visibility="private").then(
                    handlers.gallery, page, library_gallery, api_visibility="private").then(**show_title)
        demo.load(handlers.gallery, None, library_gallery, api_visibility="private").then(
            handlers.gallery_title, None, gallery_title, api_visibility="private")
    return demo


def _short_identity(identity: str) -> str:
    # A local checkpoint is named by the SHA-256 of its bytes; twelve digits tell them apart.
    return f"{identity[:19]}…" if identity.startswith("sha256:") else identity


def launch_options(args: argparse.Namespace, library: FeatureLibrary, limits: Limits) -> dict:
    """Keyword arguments for ``demo.launch``: serve the image folder only, cap uploads."""
    return dict(
        server_name=args.host, server_port=args.port, share=args.share,
        allowed_paths=[str(library.image_dir)],
        blocked_paths=[str(library.features_path), str(library.journal_path)],
        max_file_size=f"{limits.max_upload_mb}mb",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="CLIP classification and search app")
    parser.add_argument("--model", default=env("CLIP_MODEL", DEFAULT_MODEL),
                        help="CLIP model name or checkpoint path [CLIP_MODEL] (default: %(default)s)")
    parser.add_argument("--images", type=Path, default=Path(env("CLIP_IMAGES_DIR", "demo")),
                        help="image folder [CLIP_IMAGES_DIR] (default: %(default)s)")
    parser.add_argument("--features", type=Path,
                        default=Path(env("CLIP_FEATURES", "features_library.pth")),
                        help="feature file [CLIP_FEATURES] (default: %(default)s)")
    parser.add_argument("--read-only", action="store_true",
                        default=env("CLIP_READ_ONLY", "").lower() in ("1", "true", "yes"),
                        help="classify and search uploads but never store them [CLIP_READ_ONLY=1]")
    parser.add_argument("--host", default=None, help="address to bind [GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=None, help="port [GRADIO_SERVER_PORT]")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="crop",
                        help="crop: CLIP's centre crop; pad: pad to a square first")
    defaults = Limits()
    parser.add_argument("--max-upload-mb", type=int, default=defaults.max_upload_mb)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--max-labels", type=int, default=defaults.max_labels)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-files-per-add", type=int, default=defaults.max_files_per_add)
    parser.add_argument("--max-library-images", type=int, default=defaults.max_library_images,
                        help="adds beyond this many images are refused (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                    max_labels=args.max_labels, max_k=args.max_k,
                    max_files_per_add=args.max_files_per_add,
                    max_library_images=args.max_library_images)
    try:
        model = load_model(args.model, args.device, precision=args.precision,
                           preprocess=args.preprocess)
        library = FeatureLibrary(args.images, args.features, model, read_only=args.read_only,
                                 max_pixels=limits.max_pixels, max_images=limits.max_library_images)
    except (ModelLoadError, LibraryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(library)} images in {library.image_dir}; {library.last_sync.summary()}")
    classifier = ZeroShotClassifier(model, max_labels=limits.max_labels)
    # Embed the default labels in the background so the first Classify is quick.
    threading.Thread(target=classifier.label_embeddings, args=(parse_labels(DEFAULT_LABELS),),
                     daemon=True).start()
    demo = build_demo(library, classifier, read_only=args.read_only, limits=limits)
    demo.queue(default_concurrency_limit=2).launch(**launch_options(args, library, limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
