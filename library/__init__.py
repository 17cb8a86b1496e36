"""CLIP image understanding: model loading, a feature library, search and zero-shot labels."""

from .images import ImageLoadError, load_image, read_image
from .model import DEFAULT_MODEL, ClipEncoder, ModelLoadError, load_model
from .store import (
                    AddResult,
                    Entry,
                    FeatureLibrary,
                    LibraryError,
                    LibraryFormatError,
                    ReadOnlyLibraryError,
                    SyncReport,
)
from .zero_shot import ZeroShotClassifier, parse_labels

__all__ = [
    "AddResult", "ClipEncoder", "DEFAULT_MODEL", "Entry", "FeatureLibrary", "ImageLoadError",
    "LibraryError", "LibraryFormatError", "ModelLoadError", "ReadOnlyLibraryError", "SyncReport",
    "ZeroShotClassifier", "load_image", "load_model", "parse_labels", "read_image",
]
