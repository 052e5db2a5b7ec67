"""The one attention function, and hooks that read or replace its internals on any backbone.

Every attention layer in `difflab.nn` (and the processor that `difflab.interop` installs in a
wrapped diffusers UNet) calls :func:`attention`. A hook installed by :func:`attention_hooks`
sees each call with an :class:`AttnContext` (layer name, self or cross, spatial size) and may

- ``kv(ctx, k, v) -> (k, v)``: read or replace keys and values (Prompt-to-Prompt injection),
- ``probs(ctx, p) -> p``: read or replace the attention probabilities (B, H, Lq, Lk)
  (attention stores, word swap, reweighting); defining it switches that layer to the explicit
  softmax path,
- ``out(ctx, o) -> o``: read or replace the output (B, H, Lq, Dv) before the heads are merged.

Without a hook, or with one that needs no probabilities, the fused SDPA kernel runs; inside
:func:`attention_slicing` it runs on chunks of the queries (the same result, peak memory of the
scores divided by the number of chunks; `Pipeline.enable_low_memory` turns it on).

Usage::

    class Store(AttentionHook):
        def __init__(self): self.maps = {}
        def probs(self, ctx, p):
            if ctx.cross: self.maps.setdefault(ctx.name, []).append(p.detach())
            return p

    store = Store()
    with attention_hooks(unet, store):
        x0 = denoiser(x, sigma, context=tokens)
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttnContext", "AttentionHook", "HookableAttention", "attention", "attention_hooks", "attention_slicing"]

_QUERY_SLICE: ContextVar[int | None] = ContextVar("difflab_attention_query_slice", default=None)


@contextlib.contextmanager
def attention_slicing(queries: int | None) -> Iterator[None]:
    """Within the block, fused attention is computed `queries` query positions at a time (None: all
    at once). Softmax is per query row, so the output is unchanged; the (Lq, Lk) score buffer of a
    kernel shrinks to (queries, Lk) -- what "attention slicing" buys for large images on small GPUs."""
    if queries is not None and (not isinstance(queries, int) or queries < 1):
        raise ValueError(f"attention slice must be a positive number of queries, got {queries!r}")
    token = _QUERY_SLICE.set(queries)
    try:
        yield
    finally:
        _QUERY_SLICE.reset(token)


@dataclass(frozen=True)
class AttnContext:
    """Where an attention call happens: layer name, self/cross, spatial size of the queries."""

    name: str = ""
    cross: bool = False
    hw: tuple[int, ...] | None = None  # spatial (h, w) or (f, h, w) of the queries, if known
    hook: Any = None


class AttentionHook:
    """Base hook: identity everywhere. Override `kv`, `probs` and/or `out`.

    Only a subclass that overrides `probs` forces the explicit-softmax path.
    """

    def kv(self, ctx: AttnContext, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def probs(self, ctx: AttnContext, p: Tensor) -> Tensor:
        return p

    def out(self, ctx: AttnContext, o: Tensor) -> Tensor:
        return o

    @property
    def wants_probs(self) -> bool:
        return type(self).probs is not AttentionHook.probs


def _expand_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """A (B, Lk) key mask or a broadcastable (B, H|1, Lq|1, Lk) mask -> bool, broadcastable."""
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be bool (True = attend), got dtype {mask.dtype}")
    if mask.ndim == 2:
        if mask.shape != (q.shape[0], k.shape[-2]):
            raise ValueError(
                f"key mask of shape {tuple(mask.shape)} does not match batch {q.shape[0]} and {k.shape[-2]} keys"
            )
        return mask[:, None, None, :]  # (B, 1, 1, Lk)
    if mask.ndim != 4:
        raise ValueError(f"attention mask must be (B, Lk) or 4-D, got shape {tuple(mask.shape)}")
    return mask


def attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext | None = None, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v, with hooks.

    Shapes: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv).
    `mask` is bool, True = attend: (B, Lk) for a key-padding mask or broadcastable 4-D.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects 4-D (B, H, L, D) tensors, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    hook = ctx.hook if ctx is not None else None
    if mask is not None:
        mask = _expand_mask(mask, q, k)
    if hook is not None:
        k, v = hook.kv(ctx, k, v)
    if hook is not None and getattr(hook, "wants_probs", True):
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Lq, Lk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1)
        p = hook.probs(ctx, p)
        o = p.to(v.dtype) @ v
    else:
        chunk = _QUERY_SLICE.get()
        if chunk is None or q.shape[-2] <= chunk:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            parts = []
            for a in range(0, q.shape[-2], chunk):
                m = mask if mask is None or mask.shape[-2] == 1 else mask[..., a : a + chunk, :]
                parts.append(F.scaled_dot_product_attention(q[..., a : a + chunk, :], k, v, attn_mask=m))
            o = torch.cat(parts, dim=-2)  # (B, H, Lq, Dv)
    if hook is not None:
        o = hook.out(ctx, o)
    return o


class HookableAttention(nn.Module):
    """Mixin for attention layers: `self.attend(q, k, v, cross=...)` routes through hooks.

    `attention_hooks` sets `attn_name` and `attn_hook` on every such module of a model.
    """

    attn_name: str = ""
    attn_hook: Any = None

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        cross: bool,
        mask: Tensor | None = None,
        hw: tuple[int, ...] | None = None,
    ) -> Tensor:
        hook = self.attn_hook
        if hook is None:  # fast path: no context object needed
            return attention(q, k, v, None, mask)
        return attention(q, k, v, AttnContext(self.attn_name, cross, hw, hook), mask)


# Other module types (e.g. interop's diffusers processor) can register a setter here:
# a function (module, name, hook) -> bool that returns True when it handled the module.
_HOOK_SETTERS: list[Callable[[nn.Module, str, Any], bool]] = []


def register_hook_setter(fn: Callable[[nn.Module, str, Any], bool]) -> Callable:
    """Teach `attention_hooks` to install hooks on a foreign attention module type."""
    _HOOK_SETTERS.append(fn)
    return fn


def _set_hook(module: nn.Module, name: str, hook: Any) -> bool:
    if isinstance(module, HookableAttention):
        module.attn_name = name
        module.attn_hook = hook
        return True
    return any(setter(module, name, hook) for setter in _HOOK_SETTERS)


@contextlib.contextmanager
def attention_hooks(model: nn.Module, hook: Any, *, where: Callable[[str], bool] | None = None) -> Iterator[list[str]]:
    """Install `hook` on every attention layer of `model` (optionally those whose name passes
    `where`) for the duration of the block. Yields the list of hooked layer names."""
    if not hasattr(hook, "kv") or not hasattr(hook, "out") or not hasattr(hook, "probs"):
        raise TypeError(f"hook must define kv, probs and out (subclass AttentionHook); got {type(hook).__name__}")
    hooked: list[tuple[nn.Module, str]] = []
    try:
        for name, module in model.named_modules():
            if where is not None and not where(name):
                continue
            if _set_hook(module, name, hook):
                hooked.append((module, name))
        yield [name for _, name in hooked]
    finally:
        for module, name in hooked:
            _set_hook(module, name, None)
