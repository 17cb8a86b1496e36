import os
import shutil
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image

from library import FeatureLibrary, load_model
from library.testing import save_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "demo"
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "white": (1.0, 1.0, 1.0)}


class FakeEncoder:
    """A deterministic encoder: an image is its mean colour, a colour word its RGB vector.

    Ranking logic can then be checked against colours a reader can see.
    """

    dim = 8

    def __init__(self, identity="fake-colour-model"):
        self.identity = identity
        self.text_calls = 0
        self.image_calls = 0

    def preprocess(self, image):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
        return pixels.mean(dim=(0, 1)) / 255.0

    def encode_pixels(self, pixels):
        self.image_calls += 1
        features = torch.cat([pixels, torch.full((pixels.shape[0], self.dim - 3), 0.05)], dim=1)
        return features / features.norm(dim=-1, keepdim=True)

    def encode_texts(self, texts):
        self.text_calls += 1
        rows = []
        for text in texts:
            rgb = next((v for k, v in COLOURS.items() if k in text.lower()), (0.3, 0.3, 0.3))
            rows.append(torch.tensor([*rgb] + [0.05] * (self.dim - 3)))
        features = torch.stack(rows)
        return features / features.norm(dim=-1, keepdim=True)


def solid(colour, size=(40, 30)):
    """A solid-colour RGB image; ``colour`` is a name from COLOURS or an RGB tuple."""
    rgb = COLOURS.get(colour, colour) if isinstance(colour, str) else colour
    if max(rgb) <= 1.0:
        rgb = tuple(int(round(255 * c)) for c in rgb)
    return Image.new("RGB", size, rgb)


def distinct_image(i, size=(24, 24)):
    """The i-th of many images with distinct bytes and distinct colours."""
    return Image.new("RGB", size, ((i * 37) % 256, (i * 91 + 40) % 256, (i * 53 + 90) % 256))


@pytest.fixture
def fake_encoder():
    return FakeEncoder()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny CLIP saved as a plain state_dict (the kind clip.load cannot read)."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_clip.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_torchscript_checkpoint(tmp_path_factory):
    """The same tiny CLIP as a TorchScript archive, the format of OpenAI's downloads."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_clip_ts.pt", seed=0,
                           torchscript=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, "cpu")


def demo_photos(folder, names=("chelsea_cat.png", "coffee.png", "rocket.jpg", "flower.jpg")):
    """Copy a few of the starter photos into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DEMO / name, folder / name)
    return folder


@pytest.fixture
def demo_library(tmp_path, tiny_model):
    """A library of four starter photos, embedded by the tiny model."""
    library = FeatureLibrary(demo_photos(tmp_path / "images"), tmp_path / "features_library.pth",
                             tiny_model, progress=False)
    yield library
    library.close()


@pytest.fixture
def launch_app(tmp_path, monkeypatch):
    """``launch_app(library, limits=None, concurrency=1) -> url``: the app, served on localhost
    until the test ends."""
    import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demos = []

    def launch(library, limits=None, concurrency=1):
        limits = limits or app.Limits()
        demo = app.build_demo(library, limits=limits)
        options = app.launch_options(app.parse_args(["--host", "127.0.0.1"]), library, limits)
        demo.queue(default_concurrency_limit=concurrency).launch(
            prevent_thread_lock=True, quiet=True, **options)
        demos.append(demo)
        return demo.local_url

    yield launch
    for demo in demos:
        demo.close()
