"""The bf16 fast paths of the shared layers compute what the plain float32 paths compute."""

import torch
import torch.nn.functional as F

from difflab.core.attention import AttentionHook, attention_hooks
from difflab.nn.layers import Attention, group_norm


def test_group_norm_on_bf16_cpu_equals_the_float32_upcast():
    norm = group_norm(64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(4, 64, 8, 8, generator=g) * 5 + 3).bfloat16()  # far from zero mean, unit scale
    out = norm(x)
    upcast = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).bfloat16()
    assert out.dtype == torch.bfloat16
    # float32 statistics both ways: equal up to a last-bit rounding difference in a few elements
    assert (out != upcast).float().mean() < 1e-3
    torch.testing.assert_close(out.float(), upcast.float(), rtol=2**-7, atol=0)
    # and the backward agrees to bf16 precision
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 64, 8, 8, generator=g).bfloat16()
    norm(xa).backward(grad)
    F.group_norm(xb.float(), 32, norm.weight, norm.bias, norm.eps).bfloat16().backward(grad)
    assert xa.grad.dtype == torch.bfloat16
    assert (xa.grad.float() - xb.grad.float()).norm() < 1e-2 * xb.grad.float().norm()


def test_attention_under_bf16_autocast_on_cpu_runs_in_float32():
    torch.manual_seed(0)
    attn = Attention(64, 2)
    x = torch.randn(3, 16, 64)
    calls = []

    class Spy(AttentionHook):
        def out(self, ctx, o):
            calls.append(o.dtype)
            return o

    with attention_hooks(attn, Spy()), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16 and calls == [torch.float32]
    # reference: the bf16 projections (as autocast makes them), attention in float32, bf16 output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = (attn._split_heads(layer(x)) for layer in (attn.to_q, attn.to_k, attn.to_v))
    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = attn.to_out(o.transpose(1, 2).reshape(3, 16, 64))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # gradients flow through the float32 detour
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x.requires_grad_()).float().sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and attn.to_q.weight.grad.abs().sum() > 0
