import pytest
import torch

from difflab.core import EDM, Preconditioned, attention_hooks, sample_euler, sigmas_karras
from difflab.methods.p2p import P2PController, refine_mapper, word_swap_mapper
from difflab.nn import create_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = create_model(
        "unet-xs",
        image_size=8,
        in_channels=1,
        channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(8, 4),
        head_channels=8,
        context_dim=6,
    )
    with torch.no_grad():  # leave the zero init: random weights everywhere so attention matters
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for name, p in net.named_parameters():
            if "cross_attn.to_k" in name:
                p.mul_(30.0)  # peaky cross-attention maps, as a trained model has
    D = Preconditioned(net, EDM(), "edm").eval()
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 4, 6, generator=g).expand(2, 4, 6).clone()
    ctx[1, 2] = torch.randn(6, generator=g)  # the edit swaps token 2
    cond = {"context": ctx, "context_mask": torch.ones(2, 4, dtype=torch.bool)}
    x = (torch.randn(1, 1, 8, 8, generator=g) * 80).expand(2, 1, 8, 8).clone()
    return net, D, cond, x, sigmas_karras(6, 0.01, 80.0)


class Recording(P2PController):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.after = []

    def probs(self, ctx, p):
        out = super().probs(ctx, p)
        self.after.append((ctx.cross, ctx.hw, out.detach().clone()))
        return out


def test_identity_controller_changes_nothing(setup):
    net, D, cond, x, sig = setup
    base = sample_euler(D, x, sig, cond=cond)
    ctl = P2PController(2, len(sig) - 1, cross_replace=0.0, self_replace=0.0)
    with attention_hooks(net, ctl):
        out = sample_euler(D, x, sig, cond=cond, callback=ctl.callback)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)
    assert ctl.step == len(sig) - 1 and ctl.token_maps().shape[:2] == (2, 4)


def test_word_swap_injects_source_maps_then_releases(setup):
    net, D, cond, x, sig = setup
    n = len(sig) - 1
    ctl = Recording(2, n, cross_replace=0.5, self_replace=0.0)
    with attention_hooks(net, ctl):
        out = sample_euler(D, x, sig, cond=cond, callback=ctl.callback)
    cross = [p for c, _, p in ctl.after if c]
    per_step = len(cross) // n
    for k, p in enumerate(cross):
        same = torch.allclose(p[0], p[1])
        assert same == (k // per_step < n * 0.5), (k, same)
    base = sample_euler(D, x, sig, cond=cond)
    assert not torch.allclose(out[1], base[1])  # the control changed the edit
    torch.testing.assert_close(out[0], base[0], rtol=1e-4, atol=1e-4)  # never the source


def test_reweight_scales_the_token_column_and_self_injection_respects_resolution(setup):
    net, D, cond, x, sig = setup
    ctl = Recording(2, len(sig) - 1, cross_replace=0.0, self_replace=1.0, self_max_pixels=4 * 4, reweight={2: 3.0})
    x2 = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # different inputs per prompt
    with attention_hooks(net, ctl):
        D(x2, torch.full((2,), 5.0), **cond)
    for cross, hw, p in ctl.after:
        if cross:
            # with no replacement, the edit's column 2 is 3x its own softmax: rows sum to 1 + 2 p_2
            torch.testing.assert_close(p[1].sum(-1), 1 + 2 * p[1][..., 2] / 3)
        elif hw[0] * hw[1] <= 16:
            torch.testing.assert_close(p[1], p[0])
        else:
            assert not torch.allclose(p[1], p[0])


def test_local_blend_keeps_source_outside_the_word_region():
    from difflab.core.sampling import Step

    ctl = P2PController(2, 10, blend_words=[1], blend_threshold=0.3, blend_res=8)
    maps = torch.zeros(2, 3, 8, 8)
    maps[0, 1, 1, 1] = 1.0  # the word's attention peaks at (1, 1) in the source, (5, 5) in the edit
    maps[1, 1, 5, 5] = 1.0
    ctl._step_maps = {(8, 8): [maps]}
    x = torch.randn(4, 1, 8, 8)  # two CFG chunks of [source, edit]
    out = ctl.callback(Step(0, x, 1.0, 0.5, x))
    mask = ctl.last_blend_mask[0, 0]
    expect = torch.zeros(8, 8)
    expect[0:3, 0:3] = 1  # dilated by the 3x3 max-pool, union over source and edit
    expect[4:7, 4:7] = 1
    torch.testing.assert_close(mask, expect)
    for c in (0, 2):
        torch.testing.assert_close(out[c + 1, 0][mask == 0], x[c, 0][mask == 0])  # edit = source outside
        torch.testing.assert_close(out[c + 1, 0][mask == 1], x[c + 1, 0][mask == 1])  # own values inside
        torch.testing.assert_close(out[c], x[c])  # the source is never changed
    assert ctl.step == 1


def test_mappers_and_errors():
    assert refine_mapper(["a", "cat"], ["a", "big", "cat"]).tolist() == [0, -1, 1]
    assert word_swap_mapper(["a", "cat"], ["a", "dog"]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="equal token length"):
        word_swap_mapper(["a", "cat"], ["a", "big", "dog"])
    with pytest.raises(ValueError, match="n_prompts=1"):
        P2PController(1, 10)
    with pytest.raises(ValueError, match="fraction of the steps"):
        P2PController(2, 10, cross_replace=2.0)


def test_guided_controller_leaves_the_unconditional_half_free(setup):
    """Under CFG the batch is [cond chunks, uncond chunks]: only the conditional half is controlled
    (the official code's behaviour), and a batch that is not two halves is refused."""
    net, D, cond, x, sig = setup
    ctl = Recording(2, len(sig) - 1, cross_replace=1.0, self_replace=1.0, self_max_pixels=64, guided=True)
    null = {
        "context": torch.randn(cond["context"].shape, generator=torch.Generator().manual_seed(4)),
        "context_mask": cond["context_mask"],
    }
    both = {k: torch.cat([cond[k], null[k]]) for k in cond}
    x2 = torch.cat([x, x]) + torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with attention_hooks(net, ctl):
        D(x2, torch.full((4,), 5.0), **both)
    for cross, _, p in ctl.after:
        torch.testing.assert_close(p[1], p[0])  # conditional edit follows its source
        assert not torch.allclose(p[3], p[2])  # unconditional edit runs free
    with pytest.raises(ValueError, match="not \\[conditional, unconditional\\]"), attention_hooks(net, ctl):
        D(x[:1].expand(2, -1, -1, -1), torch.full((2,), 5.0), **cond)
