"""Layers shared by the networks: hookable multi-head attention, group norm, zero init."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from difflab.core.attention import HookableAttention

__all__ = ["Attention", "GroupNorm32", "group_norm", "norm_groups", "zero_module"]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= min(max_groups, channels) that divides `channels`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(f"channels must be positive, got {channels}")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (bf16-safe statistics), returned in x's dtype.

    A bf16 input on CPU goes straight to the CPU kernel with float32 weights: it loads bf16,
    computes the statistics and the normalisation in float32 and rounds the output once, as
    the upcast path below does, without two copies of x (1.5-5x faster here).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
            return nn.functional.group_norm(x, self.num_groups, _float32(self.weight), _float32(self.bias), self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        meta = x.device.type == "meta"  # shapes only (FLOP counting): no autocast there
        with contextlib.nullcontext() if meta else torch.autocast(x.device.type, enabled=False):
            weight = self.weight.to(dtype) if self.weight is not None else None
            bias = self.bias.to(dtype) if self.bias is not None else None
            out = nn.functional.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def _float32(p: Tensor | None) -> Tensor | None:
    return p if p is None or p.dtype == torch.float32 else p.float()


def group_norm(channels: int) -> GroupNorm32:
    """GroupNorm with min(32, channels) groups (the largest such count dividing channels)."""
    return GroupNorm32(norm_groups(channels), channels, eps=1e-5)


# Below this many query-key pairs, bf16 attention on CPU runs faster in float32: the fused bf16
# kernel's backward costs 2-25x the float32 one for short sequences (16 to 256 tokens, measured
# with torch 2.13 on AVX512-BF16); the attention's FLOPs are a small share of a UNet's anyway.
CPU_FP32_ATTENTION_MAX_PAIRS = 512 * 512


def _fp32_on_cpu(query: Tensor, key: Tensor) -> bool:
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.shape[-2] * key.shape[-2] <= CPU_FP32_ATTENTION_MAX_PAIRS
    )


class Attention(HookableAttention):
    """Multi-head attention over tokens: self-attention, or cross-attention to a context.

    x (B, L, dim) -> (B, L, dim). With `context_dim` set, keys and values come from
    `context` (B, T, context_dim) and `mask` (B, T) bool marks the real tokens (True).
    The hook context is `cross=True` exactly when `context_dim` is set.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        zero_out: bool = False,
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.context_dim = context_dim
        inner = num_heads * head_dim
        source_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(source_dim, inner, bias=bias)
        self.to_v = nn.Linear(source_dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        if zero_out:
            zero_module(self.to_out)

    @property
    def is_cross(self) -> bool:
        return self.context_dim is not None

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        x = x.view(b, n, self.num_heads, self.head_dim)  # (B, n, H*D) -> (B, n, H, D)
        return x.transpose(1, 2)  # (B, n, H, D) -> (B, H, n, D)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        hw: tuple[int, ...] | None = None,
    ) -> Tensor:
        b, n, _ = x.shape
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention layer called without a context")
            source = context
        else:
            if context is not None or mask is not None:
                raise ValueError("self-attention layer got a context or mask")
            source = x
        query = self._split_heads(self.to_q(x))  # (B, H, L, D)
        key = self._split_heads(self.to_k(source))  # (B, H, T, D)
        value = self._split_heads(self.to_v(source))  # (B, H, T, D)
        if _fp32_on_cpu(query, key):
            with torch.autocast("cpu", enabled=False):
                out = self.attend(query.float(), key.float(), value.float(), cross=self.is_cross, mask=mask, hw=hw)
            out = out.to(query.dtype)
        else:
            out = self.attend(query, key, value, cross=self.is_cross, mask=mask, hw=hw)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.to_out(out)  # (B, L, dim)
