"""ADM UNet: shapes for every option, zero init, conditioning wiring, masks, hooks, overfitting."""

import json

import pytest
import torch

from difflab.core.attention import AttentionHook, attention_hooks
from difflab.nn import UNet, UNetConfig, create_model, create_model_from_config
from difflab.nn.unet import ResBlock

B, C, S = 2, 3, 16  # batch, channels, side


def tiny(**overrides) -> UNet:
    """unet-xs at 16 px with attention at 16 px (32 channels, 1 head) and in the middle (2 heads)."""
    return create_model("unet-xs", **{"image_size": S, "attention_resolutions": (16,), **overrides})


def inputs(batch=B, side=S):
    return torch.randn(batch, C, side, side), torch.tensor([10.0, 700.0])[:batch]


# ---- smoke: output shapes --------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("resblock_updown", [False, True])
@pytest.mark.parametrize("use_scale_shift_norm", [False, True])
def test_smoke_unet_block_options(learn_sigma, resblock_updown, use_scale_shift_norm):
    net = tiny(
        learn_sigma=learn_sigma,
        resblock_updown=resblock_updown,
        use_scale_shift_norm=use_scale_shift_norm,
    )
    x, t = inputs()
    assert net(x, t).shape == (B, C * (2 if learn_sigma else 1), S, S)


@pytest.mark.parametrize(
    "attention",
    [
        dict(attention_resolutions=(), mid_attention=False),
        dict(attention_resolutions=(), mid_attention=True),
        dict(attention_resolutions=(16, 8), mid_attention=True),
    ],
)
def test_smoke_unet_attention_on_off(attention):
    net = tiny(**attention)
    x, t = inputs()
    assert net(x, t).shape == (B, C, S, S)


def test_smoke_unet_all_conditioning():
    net = tiny(num_classes=5, context_dim=12, extra_in_channels=2, out_channels=1, learn_sigma=True)
    x, t = inputs()
    out = net(
        x,
        t,
        class_labels=torch.tensor([0, -1]),
        context=torch.randn(B, 7, 12),
        context_mask=torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7]).bool(),
        x_cond=torch.randn(B, 2, S, S),
    )
    assert out.shape == (B, 2, S, S)


def test_smoke_unet_head_channels_and_three_levels():
    net = UNet(
        UNetConfig(
            image_size=S,
            channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8, 4),
            head_channels=8,
        )
    )
    x, t = inputs()
    assert net(x, t).shape == (B, C, S, S)
    assert net(torch.randn(1, C, 8, 12), 3.0).shape == (1, C, 8, 12)  # other sizes, scalar t


def test_smoke_unet_bf16_autocast(randomize):
    net = randomize(tiny(num_classes=3, context_dim=8))
    x, t = inputs()
    kwargs = dict(class_labels=torch.tensor([1, 2]), context=torch.randn(B, 4, 8))
    reference = net(x, t, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, **kwargs)
    assert out.dtype == torch.bfloat16 and out.shape == (B, C, S, S)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_smoke_unet_float64_and_fourier_time(randomize):
    net = randomize(tiny(time_embedding="fourier", num_classes=2)).double()
    x, t = inputs()
    out = net(x.double(), t.double() / 1000, class_labels=torch.tensor([0, 1]))
    assert out.dtype == torch.float64 and out.shape == (B, C, S, S)


# ---- zero init -------------------------------------------------------------------------------


def test_unet_output_is_zero_at_init():
    net = tiny(num_classes=4, context_dim=6, learn_sigma=True)
    x, t = inputs()
    out = net(x, t, class_labels=torch.tensor([1, 2]), context=torch.randn(B, 3, 6))
    assert torch.equal(out, torch.zeros_like(out))
    for block in net.modules():
        if isinstance(block, ResBlock):
            assert not block.conv_out.weight.any() and not block.conv_out.bias.any()


# ---- conditioning is wired -------------------------------------------------------------------


def test_unet_conditioning_changes_output(randomize):
    net = randomize(tiny(num_classes=4, extra_in_channels=1)).eval()
    x, t = inputs()
    x_cond = torch.randn(B, 1, S, S)
    base = net(x, t, class_labels=torch.tensor([1, 2]), x_cond=x_cond)
    assert not torch.allclose(base, net(x, t, class_labels=torch.tensor([3, 2]), x_cond=x_cond))
    assert not torch.allclose(base, net(x, t + 99, class_labels=torch.tensor([1, 2]), x_cond=x_cond))
    assert not torch.allclose(base, net(x, t, class_labels=torch.tensor([1, 2]), x_cond=x_cond + 1))
    # the three spellings of the null class agree
    null = [
        net(x, t, class_labels=labels, x_cond=x_cond) for labels in (None, torch.tensor([-1, -1]), torch.tensor([4, 4]))
    ]
    assert torch.equal(null[0], null[1]) and torch.equal(null[0], null[2])


def test_unet_context_mask_is_honoured(randomize):
    net = randomize(tiny(context_dim=8))
    x, t = inputs()
    context = torch.randn(B, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    base = net(x, t, context=context, context_mask=mask)

    masked_changed = context.clone()
    masked_changed[0, 3] += 5.0
    masked_changed[1, 4] -= 5.0
    assert torch.allclose(net(x, t, context=masked_changed, context_mask=mask), base, atol=1e-6)

    real_changed = context.clone()
    real_changed[0, 1] += 5.0
    out = net(x, t, context=real_changed, context_mask=mask)
    assert (out[0] - base[0]).abs().max() > 1e-4
    assert torch.allclose(out[1], base[1], atol=1e-6)  # the other sample is untouched


# ---- attention hooks -------------------------------------------------------------------------


class IdentityProbs(AttentionHook):
    def probs(self, ctx, p):
        return p


class CrossMapStore(AttentionHook):
    def __init__(self):
        self.maps = []

    def probs(self, ctx, p):
        if ctx.cross:
            self.maps.append((ctx.name, ctx.hw, p.detach().clone()))
        return p


def test_unet_identity_hook_leaves_output_unchanged(randomize):
    net = randomize(tiny(context_dim=8, attention_resolutions=(16, 8)))
    x, t = inputs()
    context = torch.randn(B, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    reference = net(x, t, context=context, context_mask=mask)
    with attention_hooks(net, IdentityProbs()) as names:
        hooked = net(x, t, context=context, context_mask=mask)
    assert len(names) == 14  # 7 attention blocks (2 down, 1 middle, 4 up), self + cross each
    assert (hooked - reference).abs().max() < 1e-5


def test_unet_probs_hook_sees_cross_attention_maps():
    net = tiny(context_dim=8)  # attention at 16 px (32 channels, 1 head) and mid (64 ch, 2 heads)
    x, t = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    store = CrossMapStore()
    with attention_hooks(net, store):
        net(x, t, context=torch.randn(B, 5, 8), context_mask=mask)
    assert len(store.maps) == 4  # down 16 px, middle 8 px, 2 x up 16 px
    for name, hw, p in store.maps:
        h, w = hw
        heads = 2 if name.startswith("mid") else 1
        assert p.shape == (B, heads, h * w, 5), name
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        assert not p[0, :, :, 3:].any()  # masked tokens get no attention
    assert sorted(hw for _, hw, _ in store.maps) == [(8, 8), (16, 16), (16, 16), (16, 16)]


# ---- h-space (Asyrp) -------------------------------------------------------------------------


def test_unet_mid_forward_hook_reads_and_replaces_bottleneck(randomize):
    net = randomize(tiny())
    x, t = inputs()
    reference = net(x, t)
    seen = []

    def read(module, args, h):
        seen.append(h.shape)

    handle = net.mid.register_forward_hook(read)
    assert torch.equal(net(x, t), reference)
    handle.remove()
    assert seen == [torch.Size([B, 64, S // 2, S // 2])]

    handle = net.mid.register_forward_hook(lambda module, args, h: h + 1.0)
    shifted = net(x, t)
    handle.remove()
    assert not torch.allclose(shifted, reference)
    assert torch.equal(net(x, t), reference)


# ---- config round trip -----------------------------------------------------------------------


def test_unet_config_round_trip_rebuilds_same_network(randomize):
    net = randomize(tiny(num_classes=3, context_dim=4, learn_sigma=True))
    values = json.loads(json.dumps(net.config_dict()))
    rebuilt = create_model_from_config(values)
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    x, t = inputs()
    kwargs = dict(class_labels=torch.tensor([0, 2]), context=torch.randn(B, 2, 4))
    assert torch.equal(rebuilt(x, t, **kwargs), net(x, t, **kwargs))


# ---- bad inputs ------------------------------------------------------------------------------


def test_unet_bad_inputs_raise_value_error():
    x, t = inputs()
    net = tiny()
    with pytest.raises(ValueError, match="4 channels"):
        net(torch.randn(B, 4, S, S), t)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        net(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(15, 16\)"):
        net(torch.randn(B, C, 15, 16), t)
    with pytest.raises(ValueError, match="x_cond"):
        net(x, t, x_cond=torch.randn(B, 1, S, S))

    cross = tiny(context_dim=8, num_classes=3, extra_in_channels=1)
    x_cond = torch.randn(B, 1, S, S)
    with pytest.raises(ValueError, match="context .* is required"):
        cross(x, t, x_cond=x_cond)
    with pytest.raises(ValueError, match="x_cond is required"):
        cross(x, t, context=torch.randn(B, 3, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        cross(x, t, context=torch.randn(B, 3, 5), x_cond=x_cond)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        empty_row = torch.tensor([[1, 0, 0], [0, 0, 0]]).bool()
        cross(x, t, context=torch.randn(B, 3, 8), context_mask=empty_row, x_cond=x_cond)
    with pytest.raises(ValueError, match="class label 7"):
        cross(x, t, class_labels=torch.tensor([0, 7]), context=torch.randn(B, 3, 8), x_cond=x_cond)

    with pytest.raises(ValueError, match=r"\[12\]"):
        UNetConfig(image_size=32, channel_mult=(1, 2), attention_resolutions=(12,))
    with pytest.raises(ValueError, match="context_dim=8"):
        UNetConfig(context_dim=8, attention_resolutions=(), mid_attention=False)


# ---- it learns -------------------------------------------------------------------------------


def test_unet_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = create_model("unet-xs", image_size=S)  # attention at 8 px
    x0 = torch.randn(8, C, S, S)
    noise = torch.randn(8, C, S, S)
    t = torch.linspace(100.0, 900.0, 8)
    alpha = torch.cos(t / 1000 * torch.pi / 2)[:, None, None, None]
    noisy = alpha * x0 + (1 - alpha**2).sqrt() * noise
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(80):
        loss = (net(noisy, t) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9  # zero output at init: the loss is E[noise^2] = 1
    assert losses[-1] < 0.05, losses[-10:]  # reaches ~3e-3 at step 50, ~2e-4 at 75 (seeds 0, 1)
