"""Zero-shot classification: labels become text prompts, an image picks the closest."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import torch

from .images import ImageSource, load_image

# OpenAI's 80 prompt templates for ImageNet (CLIP's "Prompt_Engineering_for_ImageNet" notebook).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
SINGLE_TEMPLATE = "a photo of a {}."
# The scale CLIP learned for its logits (exp of logit_scale is 100 in the released models).
LOGIT_SCALE = 100.0
DEFAULT_MAX_LABELS = 1000
# CLIP reads 77 tokens at most (the tokenizer truncates); cutting a label's text first keeps a
# huge paste cheap to tokenize and to show.
MAX_LABEL_CHARS = 300
LABEL_CACHE_SIZE = 64


def parse_labels(text: str | list[str], max_labels: int = DEFAULT_MAX_LABELS) -> list[str]:
    """Split comma- or newline-separated labels: stripped, de-duplicated, empties dropped,
    each cut to ``MAX_LABEL_CHARS``.

    Raises ``ValueError`` when no label is left or there are more than ``max_labels``.
    """
    parts = text if isinstance(text, (list, tuple)) else re.split(r"[,\n，、]", text or "")
    labels = list(dict.fromkeys(" ".join(str(p).split())[:MAX_LABEL_CHARS].strip() for p in parts))
    labels = [label for label in labels if label]
    if not labels:
        raise ValueError("no labels given: type class names separated by commas or new lines")
    if len(labels) > max_labels:
        raise ValueError(f"{len(labels)} labels given; at most {max_labels} are allowed per request")
    return labels


def label_prompts(label: str, ensemble: bool = True) -> list[str]:
    """The prompts whose embeddings stand for ``label``."""
    templates = IMAGENET_TEMPLATES if ensemble else (SINGLE_TEMPLATE,)
    return [template.format(label) for template in templates]


class ZeroShotClassifier:
    """Classifies images against label sets, caching each set's text embeddings."""

    def __init__(self, model, max_labels: int = DEFAULT_MAX_LABELS):
        self.model = model
        self.max_labels = max_labels
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def label_embeddings(self, labels: list[str], ensemble: bool = True) -> torch.Tensor:
        """``Tensor[L, D]``: per label, the re-normalised mean of its prompt embeddings."""
        key = (self.model.identity, tuple(labels), bool(ensemble))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        per_label = len(label_prompts("x", ensemble))
        prompts = [p for label in labels for p in label_prompts(label, ensemble)]
        embeddings = self.model.encode_texts(prompts).view(len(labels), per_label, -1).mean(dim=1)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        with self._lock:
            self._cache[key] = embeddings
            while len(self._cache) > LABEL_CACHE_SIZE:
                self._cache.popitem(last=False)
        return embeddings

    def classify(self, image: ImageSource, labels: str | list[str], ensemble: bool = True,
                 ) -> list[tuple[str, float]]:
        """``[(label, probability), ...]`` best first: softmax over 100 x cosine similarity."""
        labels = parse_labels(labels, self.max_labels)
        if not isinstance(image, torch.Tensor):
            image = self.model.encode_pixels(self.model.preprocess(load_image(image))[None])[0]
        probabilities = self.probabilities(image[None], labels, ensemble)[0]
        order = probabilities.argsort(descending=True).tolist()
        return [(labels[i], float(probabilities[i])) for i in order]

    def probabilities(self, image_features: torch.Tensor, labels: list[str],
                      ensemble: bool = True) -> torch.Tensor:
        """``Tensor[N, L]`` class probabilities for ``N`` normalised image embeddings."""
        text = self.label_embeddings(labels, ensemble)
        return (LOGIT_SCALE * image_features @ text.T).softmax(dim=-1)
