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


# ---- Textual Inversion ---------------------------------------------------------------------------


def _concept(n=3, seed=11):
    from difflab.data import load_dataset

    return load_dataset("shapes", "train", n=n, size=16, seed=seed).images


def test_textual_inversion_changes_one_row_and_nothing_else(base, tmp_path):
    from difflab.finetune import textual_inversion

    words = ("a {}", "a large {}", "a small {}")  # the word-level base knows only the shapes captions' words
    run = textual_inversion(
        base, _concept(), tmp_path / "ti", token="sks", init="circle", steps=4, templates=words, progress=False
    )
    config = json.loads((run / "config.json").read_text())
    assert config["adapter"] == {"kind": "textual_inversion", "base": str(base), "tokens": {"sks": "circle"}}
    assert set(load_file(str(run / "model.safetensors"))) == {"token.sks"}  # one row: the whole output
    tuned, plain = Pipeline.from_pretrained(run), Pipeline.from_pretrained(base)
    new, old = tuned.text_encoder.token_embedding.weight, plain.text_encoder.token_embedding.weight
    row = tuned.text_encoder.index["sks"]
    assert row == len(old) and torch.equal(new[:row], old)  # every other row bit for bit
    start = old[plain.text_encoder.index["circle"]]
    assert (new[row] - start).abs().max() > 1e-4  # the row itself trained away from its initial word
    theirs = plain.denoiser.net.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in tuned.denoiser.net.state_dict().items())  # frozen network
    a = tuned(2, prompt="a sks on the left", steps=3, seed=0)  # the token composes in a new prompt
    states = tuned.encode_prompts(["a sks on the left", "a circle on the left"])[0]
    assert torch.isfinite(a).all() and (states[0] - states[1]).abs().max() > 1e-4


def test_textual_inversion_bad_input_is_named(base, tmp_path):
    from difflab.finetune import concept_data, textual_inversion

    with pytest.raises(ValueError, match="already in the text encoder's vocabulary"):
        textual_inversion(base, _concept(), tmp_path / "a", token="circle", init="square", steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one image"):
        concept_data(torch.zeros(0, 3, 16, 16), "sks")
    with pytest.raises(ValueError, match=r"images of shape \(3, 32, 32\) do not fit"):
        big = torch.zeros(2, 3, 32, 32)
        textual_inversion(
            base, big, tmp_path / "b", token="sks", init="circle", steps=1, templates=("a {}",), progress=False
        )
    with pytest.raises(ValueError, match="needs token"):
        train(text_config(init_from=str(base), finetune="embeddings"), tmp_path / "c", progress=False)


def test_textual_inversion_on_a_diffusers_folder_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from difflab.finetune import textual_inversion
    from tests.interop.test_diffusers_folder import tiny_sd_folder

    sd = tiny_sd_folder(tmp_path / "sd", max_length=77)
    run = textual_inversion(
        sd, _concept(), tmp_path / "ti", token="<s*>", init="circle", steps=3, lr=0.05, progress=False
    )
    assert (run / "learned_embeds.safetensors").is_file()
    pipe = Pipeline.from_pretrained(run)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = pipe(1, prompt="a <s*> on the left", steps=3, sampler="euler", latents=latents)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(run, weight_name="learned_embeds.safetensors")  # diffusers' own loader
    want = (
        ref(
            "a <s*> on the left", num_inference_steps=3, guidance_scale=1.0, latents=latents.clone(), output_type="pt"
        ).images
        * 2
        - 1
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_textual_inversion_command_then_sampling_the_word(base, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "concept"
    folder.mkdir()
    for i, im in enumerate(_concept()):
        Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(folder / f"{i}.png")
    out = tmp_path / "ti"
    args = ["--base", str(base), "--images", str(folder), "--token", "sks", "--init", "circle", "--steps", "2"]
    assert main(["finetune", "textual-inversion", *args, "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert "learned 'sks' from 3 image(s)" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert (
        main(["sample", "--run", str(out), "--prompt", "a large sks", "--n", "2", "--steps", "2", "--out", str(grid)])
        == 0
    )
    assert grid.is_file()
    assert (
        main(["finetune", "textual-inversion", *args, "--out", str(tmp_path / "x"), "--images", str(tmp_path / "no")])
        == 2
    )
    err = capsys.readouterr().err
    assert "--images folder" in err and "does not exist" in err


# ---- DreamBooth ----------------------------------------------------------------------------------


def test_dreambooth_trains_subject_and_weighted_prior_images(base, tmp_path, monkeypatch):
    """The subject's images captioned "a circle star" (a word-level base knows no "sks": the identifier
    is a vocabulary word here) plus class images the frozen base generated for "a star", the latter's
    loss weighted by lambda: the weight reaches the loss (lambda 0 and 1 give different runs)."""
    from difflab.finetune import dreambooth

    seen = {}
    import difflab.train.loop as loop

    original = loop._LossModule.forward

    def spy(self, x0, sigma, noise, cond, weight=None):
        seen.setdefault("weights", []).append(None if weight is None else weight.clone())
        return original(self, x0, sigma, noise, cond, weight)

    monkeypatch.setattr(loop._LossModule, "forward", spy)
    kw = dict(
        identifier="circle",
        class_noun="star",
        class_images=4,
        class_steps=2,
        steps=2,
        batch_size=4,
        lr=1e-3,
        progress=False,
    )
    run = dreambooth(base, _concept(2), tmp_path / "db", prior_weight=0.5, **kw)
    weights = torch.cat(seen["weights"])
    assert set(weights.tolist()) <= {1.0, 0.5} and 0.5 in weights.tolist()  # instance 1, prior lambda
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["finetune"] == "all" and config["train"]["init_from"] == str(base)
    x = Pipeline.from_pretrained(run)(2, prompt="a circle star", steps=2, seed=0)
    assert torch.isfinite(x).all()
    off = dreambooth(base, _concept(2), tmp_path / "off", prior_weight=0.0, **kw)
    a, b = load_file(str(run / "model.safetensors")), load_file(str(off / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    lora = dreambooth(base, _concept(2), tmp_path / "lora", prior_weight=1.0, lora=True, **kw)
    assert json.loads((lora / "config.json").read_text())["adapter"]["kind"] == "lora"
    with pytest.raises(ValueError, match="prior_weight must be"):
        dreambooth(base, _concept(2), tmp_path / "bad", prior_weight=-1.0, **kw)


def test_the_dreambooth_command(base, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "subject"
    folder.mkdir()
    for i, im in enumerate(_concept(2)):
        Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(folder / f"{i}.png")
    args = ["--base", str(base), "--images", str(folder), "--identifier", "circle", "--class-noun", "star"]
    args += ["--class-images", "2", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "db"), "--no-progress"]
    assert main(["finetune", "dreambooth", *args]) == 0
    assert "fine-tuned on 2 image(s) of 'a circle star'" in capsys.readouterr().out
