"""A diffusers UNet wrapped as a difflab network: same function, difflab's attention hooks, schedules."""

import copy

import pytest
import torch

from difflab.core import AttentionHook, attention_hooks
from difflab.interop.diffusers import (
    DiffusersUNet,
    diffusers_denoiser,
    prediction_from_diffusers,
    schedule_from_diffusers,
)

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only reference dependency")


def text_unet(seed=0):
    """Tiny UNet2DConditionModel: cross-attention at 8x8 (down, up) and 4x4 (mid), 6-d tokens, 8 heads
    (this class reads attention_head_dim as the number of heads)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def class_unet(seed=0):
    """Tiny class-conditional UNet2DModel with spatial self-attention blocks (group norm, residual inside)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=5,
    ).eval()


class Record(AttentionHook):
    """Identity hook that asks for the probabilities (the explicit-softmax path) and records each call."""

    def __init__(self):
        self.calls = []

    def probs(self, ctx, p):
        self.calls.append((ctx.name, ctx.cross, ctx.hw, tuple(p.shape)))
        return p


class ZeroOut(AttentionHook):
    def out(self, ctx, o):
        return torch.zeros_like(o)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([3.0, 517.25])  # a trained and a fractional timestep
    ctx = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    return x, t, ctx, mask


@torch.no_grad()
def test_wrapped_text_unet_equals_diffusers_and_hooks_see_every_attention():
    unet = text_unet()
    ref = copy.deepcopy(unet)  # keeps diffusers' own processors
    x, t, ctx, mask = _inputs()
    expected = ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask.float()).sample
    net = DiffusersUNet(unet)
    torch.testing.assert_close(net(x, t, context=ctx, context_mask=mask), expected, rtol=1e-5, atol=1e-6)
    rec = Record()
    with attention_hooks(net, rec) as names:
        out = net(x, t, context=ctx, context_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # explicit softmax path, same function
    assert len(names) == len(net.attention_layers) == 8
    assert sorted({c[0] for c in rec.calls}) == sorted(names)
    for name, cross, hw, shape in rec.calls:
        assert cross == name.endswith("attn2"), name
        assert hw == ((4, 4) if "mid_block" in name else (8, 8)), (name, hw)  # from flat tokens
        assert shape == (2, 8, hw[0] * hw[1], 4 if cross else hw[0] * hw[1])  # (B, heads, Lq, Lk)
    with attention_hooks(net, ZeroOut()):
        changed = net(x, t, context=ctx, context_mask=mask)
    assert (changed - expected).abs().max() > 1e-3  # the hooks act on the network ...
    after = net(x, t, context=ctx, context_mask=mask)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)  # ... and leave with the block


@torch.no_grad()
def test_wrapped_class_unet_equals_diffusers_with_spatial_attention():
    unet = class_unet()
    ref = copy.deepcopy(unet)
    x, t, _, _ = _inputs(2)
    labels = torch.tensor([1, 4])
    expected = ref(x, t, class_labels=labels).sample
    net = DiffusersUNet(unet)
    rec = Record()
    with attention_hooks(net, rec):
        out = net(x, t, class_labels=labels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x, t, class_labels=labels), expected, rtol=1e-5, atol=1e-6)
    assert {(cross, hw) for _, cross, hw, _ in rec.calls} == {(False, (8, 8)), (False, (4, 4))}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_denoiser_gives_the_schedulers_x0_at_trained_timesteps(prediction_type):
    # D(x, sigma_t) in VE coordinates must be diffusers' pred_original_sample at x_t = x / sqrt(1 + sigma^2)
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    sched = diffusers.DDPMScheduler(**config)
    unet = class_unet()
    ref = copy.deepcopy(unet)
    D = diffusers_denoiser(unet, sched.config)
    assert D.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction_type]
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in (10, 400, 999):
        sigma = float(D.schedule.sigmas[t])
        out = ref(x_t, torch.tensor([t]), class_labels=torch.tensor([2])).sample
        x0_ref = sched.step(out, t, x_t).pred_original_sample
        x0 = D(x_t * (1 + sigma**2) ** 0.5, torch.tensor([sigma]), class_labels=torch.tensor([2]))
        torch.testing.assert_close(x0, x0_ref, rtol=1e-4, atol=1e-4 * (1 + sigma))


def test_schedule_mapping_and_errors():
    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        ref = diffusers.DDPMScheduler(beta_schedule=kind)
        ours = schedule_from_diffusers(ref.config)
        torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-6)
    assert prediction_from_diffusers({"prediction_type": "sample"}) == "x0"
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        schedule_from_diffusers({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        prediction_from_diffusers({"prediction_type": "flow"})
    x, t, ctx, _ = _inputs()
    text, cls = DiffusersUNet(text_unet()), DiffusersUNet(class_unet())
    with pytest.raises(ValueError, match="needs context"):
        text(x, t)
    with pytest.raises(ValueError, match="no cross-attention"):
        cls(x, t, class_labels=torch.tensor([0, 1]), context=ctx)
    with pytest.raises(ValueError, match="class label -1"):
        cls(x, t, class_labels=torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="without a class embedding"):
        text(x, t, context=ctx, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="takes 3 input channels, got 4"):
        cls(torch.zeros(2, 4, 8, 8), t, class_labels=torch.tensor([0, 1]))
    unet = class_unet()
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    unet.mid_block.attentions[0].set_processor(Custom())
    with pytest.raises(ValueError, match="'mid_block.attentions.0' uses the diffusers processor Custom"):
        DiffusersUNet(unet)
