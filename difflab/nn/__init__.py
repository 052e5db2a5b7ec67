"""Network architectures: the ADM UNet, DiT, their shared embeddings and layers, a registry.

Every network has the forward signature

    net(x, t, *, class_labels=None, context=None, context_mask=None, x_cond=None)

keeps its config dataclass as `net.config`, and round-trips through JSON::

    net = create_model("unet-s", num_classes=10)
    json.dump(net.config_dict(), open("config.json", "w"))
    same_architecture = create_model_from_config(json.load(open("config.json")))

Registry names: "unet-xs", "unet-s", "unet-m", "unet-ddpm-cifar10" and "DiT-<size>/<patch>"
with size in T, XS (tiny, for CPU) or S, B, L, XL (the paper's) and patch in 2, 4, 8.
Keyword overrides replace config fields (e.g. `image_size=28, in_channels=1`; for a DiT,
`image_size` is accepted as its `input_size`).
"""

from __future__ import annotations

from typing import Any

from difflab.nn.base import Backbone, config_from_dict, count_flops
from difflab.nn.dit import DIT_SIZES, DiT, DiTConfig
from difflab.nn.embeddings import (
    FourierFeatures,
    LabelEmbedder,
    TimestepEmbedder,
    drop_labels,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from difflab.nn.layers import Attention
from difflab.nn.unet import UNet, UNetConfig

__all__ = [
    "Attention",
    "Backbone",
    "DiT",
    "DiTConfig",
    "FourierFeatures",
    "LabelEmbedder",
    "MODEL_NAMES",
    "TimestepEmbedder",
    "UNet",
    "UNetConfig",
    "count_flops",
    "create_model",
    "create_model_from_config",
    "drop_labels",
    "model_config",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]

_ARCHS: dict[str, type[Backbone]] = {"unet": UNet, "dit": DiT}

# UNet presets, for 32x32 inputs by default. Attention is given here as downsample factors
# (`attention_downsample`) and turned into absolute resolutions for the final image_size, so
# `create_model("unet-s", image_size=28)` puts attention at 7 px where 32 px gets 8 px.
_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: 2 levels, 1 block each, attention at the second level.
    "unet-xs": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,), head_channels=32),
    # Small, for CPU training on 28/32 px images (~1 s per batch-64 step on one core).
    "unet-s": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_downsample=(4,), head_channels=32),
    # Medium: 4x the FLOPs of unet-s (~3 s per batch-64 step on 2 cores).
    "unet-m": dict(
        channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_downsample=(2, 4), head_channels=32
    ),
    # Reference: DDPM's CIFAR-10 widths (Ho et al. 2020) in ADM blocks (not DDPM's exact layers).
    "unet-ddpm-cifar10": dict(
        channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_downsample=(2,),
        num_heads=1,
        dropout=0.1,
        resblock_updown=False,
        use_scale_shift_norm=False,
    ),
}


# Tiny DiTs default to the UNet's data (32x32x3, unconditional, no learned variance); the
# paper's sizes keep DiTConfig's defaults (32x32x4 latents, 1000 classes, learned variance).
_TINY_DIT = ("T", "XS", "M")


def _dit_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for size, (hidden, depth, heads) in DIT_SIZES.items():
        for patch in (2, 4, 8):
            preset = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
            if size in _TINY_DIT:  # CPU-sized: 32x32 RGB, unconditional, like the UNet presets
                preset.update(in_channels=3, num_classes=None, learn_sigma=False)
            presets[f"DiT-{size}/{patch}"] = preset
    return presets


_DIT_PRESETS = _dit_presets()
MODEL_NAMES: tuple[str, ...] = tuple(_UNET_PRESETS) + tuple(_DIT_PRESETS)


def model_config(name: str, **overrides) -> UNetConfig | DiTConfig:
    """The config dataclass of a registered model, with keyword overrides applied."""
    if name in _UNET_PRESETS:
        config_cls, preset = UNetConfig, dict(_UNET_PRESETS[name])
        factors = preset.pop("attention_downsample")
        side = overrides.get("image_size", UNetConfig.image_size)
        preset["attention_resolutions"] = tuple(side // f for f in factors)
    elif name in _DIT_PRESETS:
        config_cls, preset = DiTConfig, _DIT_PRESETS[name]
        if "image_size" in overrides:  # the UNet's name for the input side
            side = overrides.pop("image_size")
            if overrides.setdefault("input_size", side) != side:
                raise ValueError(f"image_size={side} and input_size={overrides['input_size']} disagree")
    else:
        raise ValueError(f"unknown model name {name!r}; known: {list(MODEL_NAMES)}")
    return config_from_dict(config_cls, {**preset, **overrides})


def create_model(name: str, **overrides) -> Backbone:
    """A freshly initialised network from a registry name, e.g. "unet-s" or "DiT-T/2"."""
    config = model_config(name, **overrides)
    return UNet(config) if isinstance(config, UNetConfig) else DiT(config)


def create_model_from_config(values: dict[str, Any]) -> Backbone:
    """Rebuild a network from `model.config_dict()` (e.g. read back from config.json)."""
    arch = values.get("arch")
    if arch not in _ARCHS:
        raise ValueError(f"config has arch {arch!r}; expected one of {sorted(_ARCHS)}")
    return _ARCHS[arch].from_config_dict(values)
