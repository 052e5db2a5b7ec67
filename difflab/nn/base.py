"""What every difflab denoising network shares: config round-trip, input checks, FLOP count.

A network subclasses :class:`Backbone`, keeps its config dataclass as `self.config` and has
the forward signature

    forward(x, t, *, class_labels=None, context=None, context_mask=None, x_cond=None)

x (B, C, H, W); t (B,) or scalar, the noise-level input c_noise; class_labels (B,) long with -1
for the null class; context (B, T, context_dim) tokens with context_mask (B, T) bool, True =
real token; x_cond (B, extra_in_channels, H, W), concatenated to x (Palette-style).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from difflab.core.attention import AttentionHook, attention_hooks

__all__ = ["Backbone", "config_from_dict", "count_flops"]


class _ExplicitAttention(AttentionHook):
    """Identity hook that forces the explicit-softmax path, so its matmuls are counted."""

    def probs(self, ctx, p):
        return p


def count_flops(model: nn.Module, *args, **kwargs) -> int:
    """FLOPs of one forward `model(*args, **kwargs)`, counted by torch (2 per multiply-add).

    Attention runs through its explicit path so that its matmuls are counted (the fused CPU
    kernel is invisible to FlopCounterMode). The DiT paper's "Gflops" are multiply-adds: half
    of this number. Works on the "meta" device, so paper-size models cost no memory.
    """
    with attention_hooks(model, _ExplicitAttention()), torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    return int(counter.get_total_flops())


# A config read from a file is untrusted: every integer in it (widths, depths, sizes, vocabularies)
# is bounded, and the network it describes is counted on the meta device before any memory is
# allocated. SD's UNet has 0.86e9 parameters; nothing difflab builds from a config comes near.
MAX_CONFIG_INT = 1 << 16
MAX_PARAMETERS = 1_000_000_000


def check_config_sizes(values: Any, where: str) -> None:
    """ValueError naming the field when an integer of a JSON config (nested lists included) is
    negative or above MAX_CONFIG_INT, or a list is longer than 64 entries."""
    if isinstance(values, dict):
        for k, v in values.items():
            check_config_sizes(v, f"{where}.{k}")
    elif isinstance(values, (list, tuple)):
        if len(values) > 64 and all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{where} has {len(values)} entries; a difflab config has at most 64")
        for i, v in enumerate(values):
            check_config_sizes(v, f"{where}[{i}]")
    elif isinstance(values, int) and not isinstance(values, bool) and not -1 <= values <= MAX_CONFIG_INT:
        raise ValueError(f"{where} = {values} is out of range for a difflab model (-1 .. {MAX_CONFIG_INT})")


def config_from_dict(config_cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from its JSON dict (lists back to tuples); unknown keys fail,
    integers are bounded (`check_config_sizes`)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} field(s): {unknown}")
    check_config_sizes(values, config_cls.__name__)
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list) and "tuple" in str(fields[name].type):
            value = tuple(value)
        kwargs[name] = value
    return config_cls(**kwargs)


def load_weights(net: nn.Module, state: dict[str, Tensor], path, what: str = "the network of this run") -> None:
    """net.load_state_dict(state), with a short error naming the file when they do not fit."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {kind} (e.g. {v[0]!r})"
            for kind, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if v
        ]
        raise ValueError(f"{path} does not fit {what}: tensors " + ", ".join(parts))
    net.load_state_dict(state)


class Backbone(nn.Module):
    """Base class of difflab's denoising networks (UNet, DiT)."""

    arch: ClassVar[str] = ""
    config_cls: ClassVar[type]
    config: Any
    # gradient checkpointing (training only): each stage's activations are recomputed in the
    # backward pass instead of kept, trading compute for memory; results are unchanged
    gradient_checkpointing: bool = False

    def run_stage(self, stage, *args):
        """stage(*args), checkpointed when training with `gradient_checkpointing` on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    # ---------------------------------------------------------------------------------------
    # Config round trip
    # ---------------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict with an "arch" key; see `create_model_from_config`."""
        values = {"arch": self.arch, **dataclasses.asdict(self.config)}
        return json.loads(json.dumps(values))  # tuples -> lists, and proof that it serialises

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> "Backbone":
        """Rebuild a network (freshly initialised) from `config_dict()`'s output."""
        values = dict(values)
        arch = values.pop("arch", cls.arch)
        if arch != cls.arch:
            raise ValueError(f"config is for arch {arch!r}, not {cls.arch!r}")
        config = config_from_dict(cls.config_cls, values)
        with torch.device("meta"):  # counted before anything is allocated
            n = sum(t.numel() for t in cls(config).state_dict().values())
        if n > MAX_PARAMETERS:
            raise ValueError(
                f"this {cls.__name__} config describes {n:,} parameters, more than difflab builds from a "
                f"file ({MAX_PARAMETERS:,})"
            )
        return cls(config)

    @property
    def sample_size(self) -> int:
        """Side of the (square) input the network was built for, in pixels (or latent cells)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------
    # FLOPs
    # ---------------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 1, num_tokens: int = 8) -> tuple[tuple, dict]:
        """Inputs of the configured size (zeros) for every conditioning the network takes."""
        cfg = self.config
        device = next(self.parameters()).device
        size = self.sample_size
        x = torch.zeros(batch_size, cfg.in_channels, size, size, device=device)
        t = torch.zeros(batch_size, device=device)
        kwargs: dict[str, Any] = {}
        if cfg.num_classes is not None:
            kwargs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        if cfg.context_dim is not None:
            kwargs["context"] = torch.zeros(batch_size, num_tokens, cfg.context_dim, device=device)
        if cfg.extra_in_channels:
            kwargs["x_cond"] = torch.zeros(batch_size, cfg.extra_in_channels, size, size, device=device)
        return (x, t), kwargs

    def flops_per_image(self, num_tokens: int = 8) -> int:
        """Forward FLOPs for one image of the configured size (2 per multiply-add)."""
        args, kwargs = self.example_inputs(1, num_tokens)
        return count_flops(self, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    # Input checks
    # ---------------------------------------------------------------------------------------

    def check_inputs(
        self,
        x: Tensor,
        t: Tensor | float,
        class_labels: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
        x_cond: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Validate the forward inputs; return t as (B,) and the context mask as bool (or None)."""
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, the network expects in_channels={cfg.in_channels}")

        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or of shape ({b},), got {tuple(t.shape)}")

        if class_labels is not None and cfg.num_classes is None:
            raise ValueError("class_labels given to an unconditional network (num_classes=None)")

        if cfg.extra_in_channels:
            if x_cond is None:
                raise ValueError(f"x_cond is required: the network takes extra_in_channels={cfg.extra_in_channels}")
            if x_cond.shape != (b, cfg.extra_in_channels, h, w):
                raise ValueError(
                    f"x_cond must have shape {(b, cfg.extra_in_channels, h, w)}, got {tuple(x_cond.shape)}"
                )
        elif x_cond is not None:
            raise ValueError(f"x_cond of shape {tuple(x_cond.shape)} given to a network with extra_in_channels=0")

        if cfg.context_dim is None:
            if context is not None or context_mask is not None:
                raise ValueError("context given to a network without cross-attention (context_dim=None)")
            return t, None
        if context is None:
            raise ValueError(f"context (B, T, {cfg.context_dim}) is required: the network has cross-attention")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must have shape ({b}, T, {cfg.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
                )
            if context_mask.dtype.is_floating_point:
                raise ValueError(f"context_mask must be bool (True = real token), got dtype {context_mask.dtype}")
            context_mask = context_mask.to(device=x.device, dtype=torch.bool)
            empty = ~context_mask.any(dim=1)
            if context_mask.device.type != "meta" and empty.any():
                raise ValueError(f"context_mask rows {empty.nonzero().flatten().tolist()} mask out every token")
        return t, context_mask
