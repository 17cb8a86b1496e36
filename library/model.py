"""The CLIP model wrapper: loading (by name or local checkpoint) and batched encoding."""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

with warnings.catch_warnings():  # openai-clip imports the deprecated pkg_resources
    warnings.simplefilter("ignore", UserWarning)
    import clip
from clip.model import build_model
from PIL import Image, ImageOps, ImageStat

DEFAULT_MODEL = "ViT-B/32"
DEFAULT_CACHE_DIR = Path("~/.cache/clip").expanduser()
PREPROCESS_MODES = ("crop", "pad")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# "auto" picks bf16 on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX) only for a vision
# tower at least this large: ViT-B/32's (88M parameters) runs several times faster in bf16
# there (see bench/README.md), while a toy model gains nothing and fp32 keeps it exact.
AUTO_BF16_MIN_PARAMS = 10_000_000
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Texts are cached one by one, so a repeated query or label set costs no text-tower pass.
TEXT_CACHE_SIZE = 4096


class ModelLoadError(RuntimeError):
    """The CLIP weights could not be loaded; the message says what to do."""


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, *,
               precision: str = "auto", preprocess: str = "crop",
               download_root: str | os.PathLike | None = None) -> ClipEncoder:
    """Load CLIP weights and wrap them in a :class:`ClipEncoder`.

    Parameters
    ----------
    spec : a name from ``clip.available_models()`` (downloaded into ``~/.cache/clip``) or a
        path to a checkpoint: an OpenAI TorchScript archive or a plain ``state_dict`` file.
    device : ``"cuda"``, ``"cpu"`` or ``None`` for CUDA when present.
    precision : ``"auto"`` (fp16 on CUDA; bf16 on a CPU with native bf16 arithmetic, see
        :func:`cpu_supports_bf16`; fp32 otherwise), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        Below fp32 the weights are converted once (LayerNorms stay fp32, as in OpenAI's fp16
        models); every embedding still comes out as float32.
    preprocess : ``"crop"`` (CLIP's centre crop) or ``"pad"`` (pad to a square first).

    Raises
    ------
    ModelLoadError
        With a message naming the model, the cache folder and the ``--model PATH`` option.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, not {preprocess!r}")
    path = Path(spec).expanduser()
    if spec in clip.available_models():
        model, identity = _load_named(spec, download_root), spec
    elif path.is_file():
        model, identity = _load_checkpoint(path), "sha256:" + _file_sha256(path)
    else:
        raise ModelLoadError(
            f"{spec!r} is neither a CLIP model name ({', '.join(clip.available_models())}) "
            "nor an existing checkpoint file. Pass --model NAME or --model PATH.")
    return ClipEncoder(model, identity, device=device, precision=precision,
                       preprocess_mode=preprocess)


def _load_named(name: str, download_root) -> torch.nn.Module:
    root = Path(download_root).expanduser() if download_root else DEFAULT_CACHE_DIR
    file_name = os.path.basename(clip.clip._MODELS[name])
    try:
        model, _ = clip.load(name, device="cpu", jit=False, download_root=str(root))
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ModelLoadError(
            f"Could not load the CLIP model {name!r}: the weights are not in {root} and could "
            f"not be downloaded or verified ({reason}). On a machine with network access, download "
            f"{clip.clip._MODELS[name]} and place it at {root / file_name}, or start with "
            "--model PATH pointing at a local checkpoint file.") from None
    return model.float().eval()


def _load_checkpoint(path: Path) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but OpenAI ships it
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        # A plain torch.save(model.state_dict()) file is not TorchScript.
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable CLIP checkpoint ({exc})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    try:
        return build_model(dict(state_dict)).float().eval()
    except Exception as exc:
        raise ModelLoadError(
            f"{path} does not hold CLIP weights ({type(exc).__name__}: {exc})") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pad_to_square(image: Image.Image) -> Image.Image:
    """Pad an RGB image to a square with its mean colour, keeping objects near the edges."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    mean = tuple(round(channel) for channel in ImageStat.Stat(image.convert("RGB")).mean)
    return ImageOps.pad(image.convert("RGB"), (side, side), color=mean)


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), not by emulation."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in another torch version
        return False


class ClipEncoder:
    """CLIP's two towers behind a small API: L2-normalised float32 ``Tensor[N, D]`` out.

    Below fp32 the model's weights are converted in place (see :func:`load_model`).
    """

    def __init__(self, model: torch.nn.Module, identity: str, *, device: str = "cpu",
                 precision: str = "auto", preprocess_mode: str = "crop"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = torch.device(device)
        self.precision = _resolve_precision(precision, self.device, model)
        self.model = _convert_weights(model.to(self.device).eval(), _DTYPES[self.precision])
        self.preprocess_mode = preprocess_mode
        self.identity = identity if preprocess_mode == "crop" else f"{identity}+pad"
        self.dim = int(model.text_projection.shape[1])
        self.context_length = int(model.context_length)
        self._transform = clip.clip._transform(model.visual.input_resolution)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()  # the app encodes from several threads

    def __repr__(self) -> str:
        return (f"ClipEncoder({self.identity!r}, device={self.device.type!r}, "
                f"precision={self.precision!r})")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """CLIP's own preprocessing (resize, centre crop, normalise) of one RGB image."""
        if self.preprocess_mode == "pad":
            image = pad_to_square(image)
        return self._transform(image)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Embed RGB PIL images; returns ``Tensor[N, D]``, float32, rows of norm 1."""
        chunks = [self.encode_pixels(torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a preprocessed batch ``Tensor[N, 3, H, W]``."""
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device))
        return _normalise(features)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed texts with CLIP's tokenizer; longer than 77 tokens is truncated, not an error."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        found: dict[str, torch.Tensor] = {}
        with self._cache_lock:
            for text in texts:
                if text in self._text_cache:
                    self._text_cache.move_to_end(text)
                    found[text] = self._text_cache[text]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            rows = self._encode_text_batch(batch)
            found.update(zip(batch, rows))
            with self._cache_lock:
                for text, row in zip(batch, rows):
                    self._text_cache[text] = row
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        return torch.stack([found[t] for t in texts])

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = clip.tokenize(texts, context_length=self.context_length, truncate=True)
        with torch.inference_mode():
            features = encode_tokens(self.model, tokens.to(self.device))
        return _normalise(features)


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's ``encode_text``, run only up to the last end-of-text token in the batch.

    The text transformer is causal and its output is read at the end-of-text token (the
    highest token id), so the padding after it never changes the result: cutting it off
    gives the same embedding for a fraction of the 77-token cost.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens).type(model.dtype)
    x = x + model.positional_embedding[:length].type(model.dtype)
    x = x.permute(1, 0, 2)  # NLD -> LND
    mask = model.build_attention_mask()[:length, :length].to(x.device, x.dtype)
    for block in model.transformer.resblocks:
        normed = block.ln_1(x)
        x = x + block.attn(normed, normed, normed, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = model.ln_final(x).type(model.dtype)
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def _normalise(features: torch.Tensor) -> torch.Tensor:
    # Embeddings leave the encoder as float32 on the CPU, wherever the model runs: the store,
    # the journal and the label cache then never meet a CUDA tensor.
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()


def _resolve_precision(precision: str, device: torch.device, model: torch.nn.Module) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    vision_params = sum(p.numel() for p in model.visual.parameters())
    if device.type == "cpu" and vision_params >= AUTO_BF16_MIN_PARAMS and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def _convert_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """CLIP's own ``convert_weights`` for any dtype: matmul weights only, norms stay fp32."""
    if dtype == torch.float32:
        return model

    def convert(layer: torch.nn.Module) -> None:
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)
        if isinstance(layer, torch.nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                tensor = getattr(layer, name)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.to(dtype)

    model.apply(convert)
    return model

