"""Tiny CLIP checkpoints with random weights, for tests and offline demos (nothing downloaded)."""

from __future__ import annotations

import os
import warnings

import torch
from clip.model import CLIP

# The real architecture at toy size. build_model() infers text heads as width // 64, so the
# text width stays a multiple of 64.
TINY_SHAPE = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                  vision_patch_size=8, context_length=77, vocab_size=49408,
                  transformer_width=64, transformer_heads=1, transformer_layers=2)
# ViT-B/32's dimensions: random weights, real FLOPs (for benchmarks).
VIT_B32_SHAPE = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12)


def build_clip(shape: dict = TINY_SHAPE, seed: int = 0) -> CLIP:
    """A CLIP model of the given shape with seeded random weights, in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CLIP(**shape).float().eval()
    finally:
        torch.random.set_rng_state(generator_state)


def save_checkpoint(path: str | os.PathLike, shape: dict = TINY_SHAPE, seed: int = 0,
                    torchscript: bool = False) -> str:
    """Write a CLIP checkpoint: a plain state_dict, or a traced TorchScript archive like OpenAI's."""
    model = build_clip(shape, seed)
    if torchscript:
        image = torch.zeros(1, 3, model.visual.input_resolution, model.visual.input_resolution)
        text = torch.zeros(1, model.context_length, dtype=torch.long)
        text[0, :2] = torch.tensor([49406, 49407])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trace-time notes about shape checks
            traced = torch.jit.trace(model, (image, text), check_trace=False)
        traced.save(str(path))
    else:
        torch.save(model.state_dict(), path)
    return str(path)
