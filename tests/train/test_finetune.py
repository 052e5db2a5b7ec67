"""Fine-tuning in the one loop (`init_from`, `finetune`): the base's network, text encoder and
autoencoder are taken over; what is not trained is really frozen (bit for bit, no optimizer state);
resume stays exact; bad bases and images that do not fit are one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.pipeline import Pipeline
from difflab.train import train
from tests.train.helpers import SHAPES16, make_autoencoder, run_tensors, text_config, tiny_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny text-to-image latent run with a jointly trained word encoder (both frozen later)."""
    root = tmp_path_factory.mktemp("base")
    ae = make_autoencoder(root / "ae")
    return train(text_config(autoencoder=str(ae), steps=3), root / "run", progress=False)


def _finetune(base, out, **changes):
    values = dict(init_from=str(base), data_kwargs={**SHAPES16, "seed": 7}, steps=3, model="ignored")
    values.update(changes)
    return train(text_config(**values), out, progress=False)


def test_finetuning_starts_from_the_base_and_freezes_what_it_does_not_train(base, tmp_path):
    run = _finetune(base, tmp_path / "ft")
    config = json.loads((run / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config["train"]["init_from"] == str(base) and config["train"]["finetune"] == "all"
    assert config["model"] == base_config["model"] and config["text_encoder"] == base_config["text_encoder"]
    mine, theirs = load_file(str(run / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(mine) == set(theirs)
    encoder = [k for k in mine if k.startswith("text_encoder.")]
    assert encoder and all(torch.equal(mine[k], theirs[k]) for k in encoder)  # frozen: bit for bit
    net = [k for k in mine if not k.startswith("text_encoder.")]
    assert any(not torch.equal(mine[k], theirs[k]) for k in net)  # the denoiser was trained
    ae_mine = load_file(str(run / "autoencoder" / "model.safetensors"))
    ae_theirs = load_file(str(base / "autoencoder" / "model.safetensors"))
    assert all(torch.equal(ae_mine[k], ae_theirs[k]) for k in ae_theirs)
    optimized = {k.split(".")[1] for k in run_tensors(run) if k.startswith("optim.")}
    pipe = Pipeline.from_pretrained(run)
    assert len(optimized) == len(list(pipe.denoiser.net.parameters()))  # no optimizer state for the encoder
    x = pipe(2, prompt="a red circle", steps=2, seed=0)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_the_first_step_starts_at_the_bases_weights(base, tmp_path):
    run = _finetune(base, tmp_path / "ft0", lr=1e-12, warmup=1, ema_decay=0.0)  # a step that moves nothing
    mine, theirs = load_file(str(run / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-6


def test_finetuning_resumes_exactly(base, tmp_path):
    straight = _finetune(base, tmp_path / "a", steps=4)
    cut = train(
        text_config(init_from=str(base), data_kwargs={**SHAPES16, "seed": 7}, steps=4, save_every=2),
        tmp_path / "c",
        progress=False,
        stop_after=2,
    )
    train(
        text_config(init_from=str(base), data_kwargs={**SHAPES16, "seed": 7}, steps=4, save_every=2),
        cut,
        resume=True,
        progress=False,
    )
    a, c = run_tensors(straight), run_tensors(cut)
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith(("model.", "ema.", "final.")))


def test_bad_bases_and_images_are_one_line_errors(base, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"images of shape \(3, 32, 32\) do not fit init_from"):
        _finetune(base, tmp_path / "big", data_kwargs={"n": 64, "size": 32})
    with pytest.raises(FileNotFoundError, match="no run folder"):
        _finetune(base, tmp_path / "none", init_from=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"images of shape \(1, 16, 16\) do not fit init_from .*fmnist-unet-s"):
        train(tiny_config(init_from="fmnist-unet-s", data="digits"), tmp_path / "digits", progress=False)
    args = ["train", "--init-from", str(base), "--model", "unet-s", "--steps", "2", "--out", str(tmp_path / "cli")]
    with pytest.raises(SystemExit, match="--init-from takes the network from the base run; drop --model"):
        main(args)


@pytest.mark.parametrize("model", ["unet-xs", "DiT-T/2"])
def test_gradient_checkpointing_gives_the_same_gradients(model):
    from difflab.nn import create_model

    torch.manual_seed(0)
    net = create_model(model, image_size=16, in_channels=1, num_classes=3).train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0.1, -0.5]), torch.tensor([0, 2])
    grads = []
    for on in (False, True):
        net.gradient_checkpointing = on
        net.zero_grad()
        net(x, t, class_labels=y).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert any(g.abs().max() > 0 for g in grads[1])


def test_a_finetuning_run_with_gradient_checkpointing_matches_one_without(base, tmp_path):
    a = _finetune(base, tmp_path / "plain")
    b = _finetune(base, tmp_path / "ckpt", gradient_checkpointing=True)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5


# ---- LoRA ---------------------------------------------------------------------------------------


def test_lora_adds_r_times_in_plus_out_per_projection_and_starts_at_the_base():
    from difflab.nn import create_model
    from difflab.nn.lora import add_lora, lora_parameter_count, lora_state

    torch.manual_seed(0)
    net = create_model("unet-xs", image_size=16, in_channels=1, num_classes=3, context_dim=8)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0.3, -0.2]), torch.tensor([0, 1])
    ctx = {"context": torch.randn(2, 5, 8), "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    before = net(x, t, class_labels=y, **ctx)
    n0, want = sum(p.numel() for p in net.parameters()), lora_parameter_count(net, 3)
    add_lora(net, rank=3)
    assert sum(p.numel() for p in net.parameters()) - n0 == want > 0
    assert sum(v.numel() for v in lora_state(net).values()) == want
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n in dict(net.named_parameters()) if "lora_" in n
    }
    torch.testing.assert_close(net(x, t, class_labels=y, **ctx), before)  # B = 0: the base's function


def test_a_lora_run_is_small_freezes_the_base_and_round_trips(base, tmp_path):
    run = _finetune(base, tmp_path / "lora", finetune="lora", lora_rank=2, lr=1e-2)
    config = json.loads((run / "config.json").read_text())
    assert config["adapter"]["kind"] == "lora" and config["adapter"]["base"] == str(base)
    assert not (run / "autoencoder").exists()  # the base's is used
    adapter = load_file(str(run / "model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    size, base_size = (run / "model.safetensors").stat().st_size, (base / "model.safetensors").stat().st_size
    assert size < base_size / 5
    optimized = {k.split(".")[1] for k in run_tensors(run) if k.startswith("optim.")}
    assert len(optimized) == len(adapter)  # the optimizer holds the adapters alone
    pipe = Pipeline.from_pretrained(run)  # base + adapters
    base_pipe = Pipeline.from_pretrained(base)
    frozen = {k: v for k, v in pipe.denoiser.net.state_dict().items() if "lora_" not in k}
    theirs = base_pipe.denoiser.net.state_dict()
    assert all(torch.equal(v, theirs[k.replace(".base_layer", "")]) for k, v in frozen.items())  # bit for bit
    kw = dict(prompt=["a red circle", "a blue square"], steps=3, seed=0)
    tuned, plain = pipe(2, **kw), base_pipe(2, **kw)
    assert (tuned - plain).abs().max() > 1e-4  # the adapters change the model
    torch.testing.assert_close(Pipeline.from_pretrained(run)(2, **kw), tuned)  # save/load round trip


def test_lora_resumes_exactly_and_bad_adapters_are_named(base, tmp_path):
    kw = dict(init_from=str(base), data_kwargs={**SHAPES16, "seed": 7}, steps=4, save_every=2, finetune="lora")
    straight = train(text_config(**kw), tmp_path / "a", progress=False)
    cut = train(text_config(**kw), tmp_path / "c", progress=False, stop_after=2)
    train(text_config(**kw), cut, resume=True, progress=False)
    a, c = run_tensors(straight), run_tensors(cut)
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith(("model.", "ema.", "final.")))
    config = json.loads((cut / "config.json").read_text())
    config["adapter"]["base"] = str(tmp_path / "gone")
    (cut / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="LoRA adapters for the base .*gone, which is not there"):
        Pipeline.from_pretrained(cut)
    with pytest.raises(ValueError, match="finetune='lora' adapts a trained model: give init_from"):
        train(tiny_config(finetune="lora"), tmp_path / "x", progress=False)


# ---- LoRA on a diffusers Stable Diffusion folder ----------------------------------------------------


def test_lora_on_a_diffusers_folder_loads_in_diffusers_with_the_same_images(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.interop.test_diffusers_folder import tiny_sd_folder

    sd = tiny_sd_folder(tmp_path / "sd", max_length=77)  # room for the shapes captions, one token a letter
    cfg = text_config(init_from=str(sd), finetune="lora", lora_rank=2, lora_alpha=4.0, steps=3, lr=3e-2)
    run = train(cfg, tmp_path / "lora", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["sigma_sampler"] == "discrete_uniform" and config["train"]["prediction"] == "eps"
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    pipe = Pipeline.from_pretrained(run)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["a red circle", "a blue square"], steps=4, guidance_scale=3.0)
    got = pipe(2, sampler="euler", latents=latents, **kw)
    plain = Pipeline.from_pretrained(sd)(2, sampler="euler", latents=latents, **kw)
    assert (got - plain).abs().max() > 1e-3  # the adapters matter
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(run)  # diffusers' own loader reads the exported file
    want = ref(kw["prompt"], num_inference_steps=4, guidance_scale=3.0, latents=latents.clone(), output_type="pt")
    torch.testing.assert_close(got, want.images * 2 - 1, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="fine-tune it with --finetune lora"):
        train(text_config(init_from=str(sd), steps=1), tmp_path / "all", progress=False)
