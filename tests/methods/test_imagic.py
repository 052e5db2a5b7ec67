"""Imagic (Kawar et al. 2023): the three stages on a tiny text-conditional UNet, and `difflab edit imagic`.

Checks that can fail: stage A lowers the reconstruction loss on held-out noisings while every weight
of the model stays bit-identical and gets no gradient; stage B changes a copy only (LoRA: only the
adapters); stage C at eta 0 is exactly the sample under the optimised embedding and at eta 1 under
the target text; bad input is a one-line error.
"""

import pytest
import torch

from difflab.core import EDM, Preconditioned, sigmas_karras
from difflab.core.losses import lognormal
from difflab.core.sampling import sample
from difflab.methods.imagic import (
    finetune_on_image,
    imagic_fit,
    interpolate_cond,
    optimize_embedding,
    parse_etas,
)
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
    with torch.no_grad():  # random weights everywhere, so that the text reaches the output
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    D = Preconditioned(net, EDM(), "edm").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    cond = {"context": torch.randn(1, 4, 6, generator=g), "context_mask": torch.ones(1, 4, dtype=torch.bool)}
    x0 = torch.tanh(torch.randn(1, 1, 8, 8, generator=g))
    return D, cond, x0


def _held_out_loss(D, x0, cond, n=32):
    """The denoising loss on n fixed noisings (not the ones the optimisation drew)."""
    g = torch.Generator().manual_seed(1234)
    sigma = lognormal()(n, g).to(x0.dtype)
    noise = torch.randn((n, *x0.shape[1:]), generator=g)
    c = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
    with torch.no_grad():
        return float(D.loss(x0.expand(n, *x0.shape[1:]), sigma, noise, **c).mean())


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def zoo_text():
    from difflab.assets import resolve_run
    from difflab.data.shapes import render
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(resolve_run("shapes-text-unet"))
    image = render({"shape": "circle", "color": "red", "size": "large", "position": "left"})[None]
    return pipe, image


def test_stage_a_lowers_the_loss_and_leaves_the_model_untouched(zoo_text):
    """On the zoo's shapes model, a red circle and the text of a green star: the optimised embedding
    reconstructs the circle (held-out loss down by more than a fifth), no weight moves."""
    pipe, x0 = zoo_text
    D, cond = pipe.denoiser, pipe.cond("a small green star on the right")
    before = _weights(D)
    e_opt, losses = optimize_embedding(D, x0, cond, steps=20, lr=1e-2, batch=4)
    assert len(losses) == 20
    assert _held_out_loss(D, x0, e_opt) < 0.8 * _held_out_loss(D, x0, cond)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert all(p.grad is None for p in D.parameters())
    assert torch.equal(e_opt["context_mask"], cond["context_mask"])
    assert not torch.equal(e_opt["context"], cond["context"])


def test_stage_b_tunes_a_copy_only(setup):
    D, cond, x0 = setup
    before = _weights(D)
    tuned, losses = finetune_on_image(D, x0, cond, steps=30, lr=3e-3, batch=8)
    assert tuned is not D and len(losses) == 30
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert _held_out_loss(tuned, x0, cond) < 0.9 * _held_out_loss(D, x0, cond)
    assert not any(p.requires_grad for p in tuned.parameters()) and not tuned.training


def test_stage_b_with_lora_trains_the_adapters_only(setup):
    pytest.importorskip("peft")
    D, cond, x0 = setup
    tuned, _ = finetune_on_image(D, x0, cond, steps=5, lr=1e-2, batch=2, lora_rank=2)
    state = tuned.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora
    base = _weights(D)
    # every weight but the adapters is the base's, bit for bit (peft renames a wrapped Linear's weight)
    for k, v in state.items():
        if "lora_" in k:
            continue
        assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in lora if "lora_B" in k)


def test_stage_c_interpolates_between_the_two_embeddings(setup):
    D, cond, x0 = setup
    target = {**cond, "context": cond["context"] + 1.0}
    fit = imagic_fit(D, x0, target, embed_steps=3, embed_lr=1e-2, tune_steps=2, tune_lr=1e-3, batch=2)
    sig = sigmas_karras(4, 0.01, 80.0)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 80
    at = lambda eta: fit.generate(eta, sig, x_T=x_T, method="euler")  # noqa: E731
    assert torch.equal(at(0.0), sample(fit.denoiser, x_T, sig, method="euler", cond=fit.e_opt))
    assert torch.equal(at(1.0), sample(fit.denoiser, x_T, sig, method="euler", cond=target))
    mid = interpolate_cond(fit.e_tgt, fit.e_opt, 0.5)["context"]
    torch.testing.assert_close(mid, (fit.e_tgt["context"] + fit.e_opt["context"]) / 2)
    assert not torch.equal(at(0.0), at(1.0))
    # the default start: unit noise from the generator times sigma_max, the same for every eta
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(
        fit.generate(0.3, sig, noise=g(), method="euler"), fit.generate(0.3, sig, noise=g(), method="euler")
    )


def test_bad_input_is_a_one_line_error(setup):
    D, cond, x0 = setup
    with pytest.raises(ValueError, match="Imagic eta must be"):
        interpolate_cond(cond, cond, 1.5)
    with pytest.raises(ValueError, match="no text embedding"):
        optimize_embedding(D, x0, {"class_labels": torch.tensor([0])}, steps=1)
    with pytest.raises(ValueError, match=r"one image \(1, C, H, W\), got shape \(2, 1, 8, 8\)"):
        imagic_fit(D, x0.expand(2, -1, -1, -1), cond)
    with pytest.raises(ValueError, match="imagic sweep must be comma-separated"):
        parse_etas("0,half")
    with pytest.raises(ValueError, match="imagic sweep eta must be"):
        parse_etas("0,2")
    assert parse_etas(" 0, 0.5,1 ") == [0.0, 0.5, 1.0] and parse_etas("") == []


def test_difflab_edit_imagic_on_the_zoo_text_model(zoo_text):
    from difflab.edit import edit

    pipe, image = zoo_text
    before = _weights(pipe.denoiser)
    r = edit(
        pipe,
        "imagic",
        image,
        prompt="a large green circle on the left",
        steps=2,
        embed_steps=2,
        tune_steps=1,
        batch=1,
        sweep="0,1",
        seed=3,
    )
    assert r.output.shape == (1, 3, 32, 32) and torch.isfinite(r.output).all()
    assert [c for c, _ in r.tiles] == ["input", "eta 0 (reconstruction)", "eta 1", "output (eta 0.7)"]
    assert r.info["embed_loss_end"] is not None and r.info["tune_loss_end"] is not None
    assert all(torch.equal(before[k], v) for k, v in pipe.denoiser.state_dict().items())
    with pytest.raises(ValueError, match="imagic needs --prompt"):
        edit(pipe, "imagic", image, steps=2)
    with pytest.raises(ValueError, match="imagic eta must be"):
        edit(pipe, "imagic", image, prompt="a red star", eta=1.2)


def test_imagic_refuses_a_class_model(tiny_run):
    from difflab.edit import edit
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_run)
    C, H, W = pipe.image_shape()
    with pytest.raises(ValueError, match="imagic optimises a text embedding: it needs a text-to-image model"):
        edit(pipe, "imagic", torch.zeros(1, C, H, W), prompt="0", steps=1, embed_steps=1, tune_steps=1)


# UniTune (Valevski et al. 2022) shares stage B's fine-tuning on one image


def test_unitune_edit_is_sdedit_on_the_tuned_model_then_the_blend(setup):
    from difflab.methods.sdedit import sdedit
    from difflab.methods.unitune import unitune_edit, unitune_fit

    D, cond, x0 = setup
    before = _weights(D)
    tuned, losses = unitune_fit(D, x0, cond, steps=3, lr=1e-3, batch=2)
    assert len(losses) == 3 and all(torch.equal(before[k], v) for k, v in D.state_dict().items())
    tail = sigmas_karras(4, 0.01, 5.0)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    out = unitune_edit(tuned, x0, tail, cond, guidance_scale=1.0, noise=g())
    assert torch.equal(out, sdedit(tuned, x0, tail, strength=1.0, cond=cond, noise=g()))
    half = unitune_edit(tuned, x0, tail, cond, guidance_scale=1.0, blend=0.25, noise=g())
    torch.testing.assert_close(half, 0.75 * out + 0.25 * x0)
    assert torch.equal(unitune_edit(tuned, x0, tail, cond, guidance_scale=1.0, blend=1.0, noise=g()), x0)
    with pytest.raises(ValueError, match="unitune blend must be"):
        unitune_edit(tuned, x0, tail, cond, blend=1.5)
    with pytest.raises(ValueError, match="needs uncond"):
        unitune_edit(tuned, x0, tail, cond, guidance_scale=2.0)


def test_difflab_edit_unitune_on_the_zoo_text_model(zoo_text):
    from difflab.edit import edit

    pipe, image = zoo_text
    before = _weights(pipe.denoiser)
    r = edit(pipe, "unitune", image, prompt="a green circle", steps=4, tune_steps=2, batch=1, seed=1)
    assert r.output.shape == (1, 3, 32, 32) and torch.isfinite(r.output).all()
    assert r.info["edit_prompt"] == "sks a green circle" and r.info["sigma_t0"] > 0
    assert all(torch.equal(before[k], v) for k, v in pipe.denoiser.state_dict().items())
    with pytest.raises(ValueError, match="unitune identifier must be one word, got 'two words'"):
        edit(pipe, "unitune", image, prompt="a green circle", identifier="two words", tune_steps=1)


def test_a_diverging_fine_tune_is_a_one_line_error(setup):
    D, cond, x0 = setup
    with pytest.raises(ValueError, match="Imagic fine-tuning diverged .* at lr 1e\\+30"):
        finetune_on_image(D, x0, cond, steps=3, lr=1e30, batch=2)


@pytest.mark.parametrize("method", ["imagic", "unitune"])
def test_the_zoo_latent_model_edits_through_its_autoencoder(method):
    """On shapes-text-ldm the input is encoded, optimised on as latents and decoded for the strip."""
    from difflab.assets import resolve_run
    from difflab.data.shapes import render
    from difflab.edit import edit
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(resolve_run("shapes-text-ldm"))
    image = render({"shape": "square", "color": "red", "size": "large", "position": "left"})[None]
    kw = {"imagic": {"embed_steps": 1, "sweep": "0"}, "unitune": {}}[method]
    r = edit(pipe, method, image, prompt="a green square", steps=2, tune_steps=1, batch=1, **kw)
    assert r.output.shape == image.shape and all(t.shape == image.shape for _, t in r.tiles)
    assert torch.isfinite(r.output).all()
