"""DiT: shapes, adaLN-Zero identity at init, patch layout, masks, hooks, FLOPs, overfitting."""

import json

import pytest
import torch

from difflab.core.attention import AttentionHook, attention_hooks
from difflab.nn import DiT, DiTConfig, create_model, create_model_from_config, model_config
from difflab.nn.embeddings import sincos_pos_embed_2d

B, C, S = 2, 3, 16


def tiny(patch: int = 2, **overrides) -> DiT:
    return create_model(f"DiT-T/{patch}", input_size=S, **overrides)


def inputs(batch=B, side=S):
    return torch.randn(batch, C, side, side), torch.tensor([10.0, 700.0])[:batch]


# ---- smoke: output shapes --------------------------------------------------------------------


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_smoke_dit_patch_and_learn_sigma(patch, learn_sigma):
    net = tiny(patch, learn_sigma=learn_sigma)
    x, t = inputs()
    assert net(x, t).shape == (B, C * (2 if learn_sigma else 1), S, S)


def test_smoke_dit_all_conditioning():
    net = tiny(
        num_classes=5, class_dropout_prob=0.1, context_dim=12, extra_in_channels=2, out_channels=1, learn_sigma=True
    )
    x, t = inputs()
    out = net(
        x,
        t,
        class_labels=torch.tensor([4, -1]),
        context=torch.randn(B, 6, 12),
        context_mask=torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6]).bool(),
        x_cond=torch.randn(B, 2, S, S),
    )
    assert out.shape == (B, 2, S, S)


def test_smoke_dit_other_input_sizes_and_fourier_time():
    net = tiny(4, time_embedding="fourier")
    assert net(torch.randn(1, C, 8, 12), 0.5).shape == (1, C, 8, 12)


def test_smoke_dit_bf16_autocast(randomize):
    net = randomize(tiny(num_classes=3, context_dim=8)).eval()
    x, t = inputs()
    kwargs = dict(class_labels=torch.tensor([1, 2]), context=torch.randn(B, 4, 8))
    reference = net(x, t, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, **kwargs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_smoke_dit_float64(randomize):
    net = randomize(tiny(4, num_classes=2, context_dim=4)).double()
    x, t = inputs()
    out = net(x.double(), t, class_labels=torch.tensor([0, 1]), context=torch.randn(B, 3, 4).double())
    assert out.dtype == torch.float64 and out.shape == (B, C, S, S)


# ---- adaLN-Zero: identity blocks and zero output at init -------------------------------------


@pytest.mark.parametrize("context_dim", [None, 8])
def test_dit_blocks_are_identity_at_init(context_dim):
    net = tiny(num_classes=4, context_dim=context_dim)
    tokens = torch.randn(B, 64, 64)
    c = torch.randn(B, 64)
    context = torch.randn(B, 3, 8) if context_dim else None
    for block in net.blocks:
        assert torch.equal(block(tokens, c, context), tokens)


def test_dit_output_is_zero_at_init():
    net = tiny(num_classes=4, context_dim=8, learn_sigma=True)
    x, t = inputs()
    out = net(x, t, class_labels=torch.tensor([0, 3]), context=torch.randn(B, 3, 8))
    assert torch.equal(out, torch.zeros_like(out))


# ---- patch layout and positions --------------------------------------------------------------


def test_dit_unpatchify_puts_each_token_at_its_patch():
    net = tiny(4)  # 16 px / 4 = 4 x 4 tokens, 4*4*3 values each
    grid, p = S // 4, 4
    tokens = torch.arange(grid * grid, dtype=torch.float32)[None, :, None].expand(1, -1, p * p * C)
    image = net.unpatchify(tokens, grid, grid)  # (1, C, 16, 16)
    rows = torch.arange(S)[:, None] // p
    cols = torch.arange(S)[None, :] // p
    assert torch.equal(image[0], (rows * grid + cols).float().expand(C, S, S))
    # and the values inside a token fill its patch channel-last: (p, p, C)
    tokens = torch.arange(p * p * C, dtype=torch.float32)[None, None, :].expand(1, grid * grid, -1)
    image = net.unpatchify(tokens, grid, grid)
    assert image[0, 2, 1, 3].item() == (1 * p + 3) * C + 2


def test_sincos_positions_match_the_formula():
    pos = sincos_pos_embed_2d(8, 3, 5)  # (15, 8): [sin x, cos x] * 2 freqs, then the same for y
    assert pos.shape == (15, 8)
    row, col = 2, 4
    token = pos[row * 5 + col]
    freqs = torch.tensor([1.0, 0.01])  # 10000^(-i/2), i = 0, 1
    expected = torch.cat(
        [torch.sin(col * freqs), torch.cos(col * freqs), torch.sin(row * freqs), torch.cos(row * freqs)]
    )
    assert torch.allclose(token, expected, atol=1e-6)
    net = tiny(2)
    assert torch.equal(net.pos_embed[0], sincos_pos_embed_2d(64, 8, 8))
    assert "pos_embed" not in net.state_dict()


# ---- conditioning, masks and hooks -----------------------------------------------------------


def test_dit_labels_and_null_class(randomize):
    net = randomize(tiny(num_classes=4)).eval()  # eval: no label dropout
    x, t = inputs()
    base = net(x, t, class_labels=torch.tensor([1, 2]))
    assert not torch.allclose(base, net(x, t, class_labels=torch.tensor([0, 2])))
    nulls = [net(x, t, class_labels=y) for y in (None, torch.tensor([-1, -1]), torch.tensor([4, 4]))]
    assert torch.equal(nulls[0], nulls[1]) and torch.equal(nulls[0], nulls[2])


def test_dit_label_dropout_only_in_training(randomize):
    net = randomize(tiny(num_classes=4, class_dropout_prob=1.0))
    x, t = inputs()
    labels = torch.tensor([1, 2])
    null = net.eval()(x, t)
    assert torch.equal(net.train()(x, t, class_labels=labels), null)
    assert not torch.allclose(net.eval()(x, t, class_labels=labels), null)


def test_dit_context_mask_is_honoured(randomize):
    net = randomize(tiny(context_dim=8))
    x, t = inputs()
    context = torch.randn(B, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    base = net(x, t, context=context, context_mask=mask)
    changed = context.clone()
    changed[0, 2:] += 5.0
    changed[1, 4] += 5.0
    assert torch.allclose(net(x, t, context=changed, context_mask=mask), base, atol=1e-6)
    changed[0, 0] += 5.0
    assert (net(x, t, context=changed, context_mask=mask) - base)[0].abs().max() > 1e-4


class IdentityProbs(AttentionHook):
    def probs(self, ctx, p):
        return p


class MapStore(AttentionHook):
    def __init__(self):
        self.maps = []

    def probs(self, ctx, p):
        self.maps.append((ctx.name, ctx.cross, ctx.hw, p.shape))
        return p


def test_dit_identity_hook_leaves_output_unchanged(randomize):
    net = randomize(tiny(context_dim=8))
    x, t = inputs()
    context = torch.randn(B, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    reference = net(x, t, context=context, context_mask=mask)
    with attention_hooks(net, IdentityProbs()) as names:
        hooked = net(x, t, context=context, context_mask=mask)
    assert len(names) == 8  # 4 blocks x (self, cross)
    assert (hooked - reference).abs().max() < 1e-5


def test_dit_probs_hook_sees_maps_with_right_shapes():
    net = tiny(4, context_dim=8)  # 4 x 4 tokens, 2 heads
    store = MapStore()
    x, t = inputs()
    with attention_hooks(net, store):
        net(x, t, context=torch.randn(B, 5, 8))
    assert len(store.maps) == 8
    for name, cross, hw, shape in store.maps:
        assert hw == (4, 4)
        assert shape == (B, 2, 16, 5 if cross else 16), name
    assert sum(cross for _, cross, _, _ in store.maps) == 4


# ---- config round trip and FLOPs -------------------------------------------------------------


def test_dit_config_round_trip_rebuilds_same_network(randomize):
    net = randomize(tiny(4, num_classes=3, learn_sigma=True)).eval()
    rebuilt = create_model_from_config(json.loads(json.dumps(net.config_dict()))).eval()
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    x, t = inputs()
    labels = torch.tensor([0, 2])
    assert torch.equal(rebuilt(x, t, class_labels=labels), net(x, t, class_labels=labels))


@pytest.mark.parametrize(
    "name, gmacs, mparams",
    [("DiT-S/2", 6.06, 33.0), ("DiT-B/4", 5.56, 130.5), ("DiT-XL/2", 118.64, 675.0)],
)
def test_dit_paper_sizes_match_the_paper_flops_and_params(name, gmacs, mparams):
    """DiT Table 4 (Gflops as multiply-adds, 256 px = 32x32x4 latents) and Table 1 params."""
    with torch.device("meta"):
        net = DiT(model_config(name))
    assert abs(net.flops_per_image() / 2e9 / gmacs - 1) < 0.005
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 / mparams - 1) < 0.01


# ---- bad inputs ------------------------------------------------------------------------------


def test_dit_bad_inputs_raise_value_error():
    x, t = inputs()
    net = tiny(4)
    with pytest.raises(ValueError, match="1 channels"):
        net(torch.randn(B, 1, S, S), t)
    with pytest.raises(ValueError, match=r"\(18, 16\) is not divisible by patch_size 4"):
        net(torch.randn(B, C, 18, 16), t)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context_dim=None"):
        net(x, t, context=torch.randn(B, 2, 8))
    with pytest.raises(ValueError, match="context .* is required"):
        tiny(context_dim=8)(x, t)
    with pytest.raises(ValueError, match="input_size 18 is not divisible by patch_size 4"):
        DiTConfig(input_size=18, patch_size=4)
    with pytest.raises(ValueError, match="unknown model name 'DiT-Q/2'"):
        create_model("DiT-Q/2")


# ---- it learns -------------------------------------------------------------------------------


def test_dit_overfits_a_fixed_batch():
    torch.manual_seed(0)
    net = tiny(2)
    x0 = torch.randn(8, C, S, S)
    noise = torch.randn(8, C, S, S)
    t = torch.linspace(100.0, 900.0, 8)
    alpha = torch.cos(t / 1000 * torch.pi / 2)[:, None, None, None]
    noisy = alpha * x0 + (1 - alpha**2).sqrt() * noise
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = (net(noisy, t) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9
    assert losses[-1] < 0.1, losses[-10:]  # reaches < 0.003 for seeds 0-2
