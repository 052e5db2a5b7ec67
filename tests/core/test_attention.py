import math

import pytest
import torch
from torch import nn

from difflab.core import AttentionHook, HookableAttention, attention, attention_hooks


class TinyAttn(HookableAttention):
    def __init__(self, dim=8, heads=2, cross=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, ctx=None, mask=None):
        B, L, C = x.shape
        src = ctx if ctx is not None else x
        split = lambda t: t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, H, L, d)  # noqa: E731
        o = self.attend(
            split(self.to_q(x)),
            split(self.to_k(src)),
            split(self.to_v(src)),
            cross=ctx is not None,
            mask=mask,
            hw=(2, L // 2),
        )
        return o.transpose(1, 2).reshape(B, L, C)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = TinyAttn()
        self.cross_attn = TinyAttn(cross=True)

    def forward(self, x, ctx, mask=None):
        return self.cross_attn(self.self_attn(x), ctx, mask)


def _reference(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def test_attention_equals_softmax_reference_with_and_without_mask():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(attention(q, k, v), _reference(q, k, v))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch.testing.assert_close(attention(q, k, v, mask=mask), _reference(q, k, v, mask))


class Identity(AttentionHook):
    def probs(self, ctx, p):
        return p


class Store(AttentionHook):
    def __init__(self):
        self.seen = []

    def probs(self, ctx, p):
        self.seen.append((ctx.name, ctx.cross, ctx.hw, tuple(p.shape), p.sum(-1)))
        return p


def test_identity_hook_leaves_outputs_unchanged_and_store_sees_maps():
    torch.manual_seed(0)
    m = Model()
    x, ctx = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    base = m(x, ctx)
    with attention_hooks(m, Identity()) as names:
        torch.testing.assert_close(m(x, ctx), base, rtol=1e-5, atol=1e-6)
    assert names == ["self_attn", "cross_attn"]
    store = Store()
    with attention_hooks(m, store):
        m(x, ctx)
    assert [(n, c, hw, s) for n, c, hw, s, _ in store.seen] == [
        ("self_attn", False, (2, 3), (2, 2, 6, 6)),
        ("cross_attn", True, (2, 3), (2, 2, 6, 4)),
    ]
    for *_, sums in store.seen:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    assert m.self_attn.attn_hook is None  # removed on exit
    torch.testing.assert_close(m(x, ctx), base)


def test_hooks_can_replace_kv_probs_and_out_and_filter_layers():
    torch.manual_seed(0)
    m = Model()
    x, ctx = torch.randn(2, 6, 8), torch.randn(2, 4, 8)

    class ZeroOut(AttentionHook):
        def out(self, c, o):
            return torch.zeros_like(o)

    with attention_hooks(m, ZeroOut(), where=lambda n: n == "cross_attn"):
        out = m(x, ctx)
    # cross-attention output zeroed -> only the out-projection bias... no projection here: zero
    assert torch.count_nonzero(out) == 0

    class Uniform(AttentionHook):
        def probs(self, c, p):
            return torch.full_like(p, 1.0 / p.shape[-1])

    with attention_hooks(m, Uniform(), where=lambda n: n == "cross_attn"):
        out = m(x, ctx)
    v = m.cross_attn.to_v(ctx).mean(1, keepdim=True).expand(2, 6, 8)  # mean of values
    torch.testing.assert_close(out, v, rtol=1e-5, atol=1e-6)

    class SwapKV(AttentionHook):
        def kv(self, c, k, v):
            return k, torch.ones_like(v)

    with attention_hooks(m, SwapKV(), where=lambda n: n == "cross_attn"):
        torch.testing.assert_close(m(x, ctx), torch.ones(2, 6, 8))


def test_attention_errors():
    with pytest.raises(ValueError, match="4-D"):
        attention(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    q = torch.zeros(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"key mask of shape \(2, 5\)"):
        attention(q, q, q, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        attention(q, q, q, mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="hook must define"):
        with attention_hooks(Model(), object()):
            pass
