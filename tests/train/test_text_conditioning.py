"""Text-conditional and latent training in the one loop: exact resume, caption dropout, what the
Pipeline does with prompts (the CFG convention s = 1 + w), and clear errors for bad inputs.

Runs are tiny (16x16 shapes, unet-xs at 16 channels, a few steps): they check the plumbing and
the properties that must hold at any training length, not sample quality.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflab.pipeline import Pipeline
from difflab.train import TrainConfig, train
from difflab.train import loop
from tests.train.helpers import (
    WORD,
    log_rows,
    make_autoencoder,
    minilm_or_skip,
    one_thread,
    run_tensors,
    text_config,
    tiny_config,
)

PROMPT, OTHER = "a large red circle on the left", "a small blue square at the top"


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    with one_thread():
        return make_autoencoder(tmp_path_factory.mktemp("ae") / "ae")


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    """A 6-step text-conditional run with a jointly trained word encoder."""
    with one_thread():
        return train(text_config(), tmp_path_factory.mktemp("word") / "run", progress=False)


# --------------------------------------------------------------------------------------------
# Training: exact resume, what config.json records
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space, encoder", [("pixel", "word"), ("pixel", "minilm"), ("latent", "minilm")])
def test_text_run_trains_saves_and_resumes_bit_for_bit(tmp_path, autoencoder, space, encoder):
    if encoder == "minilm":
        minilm_or_skip()
    cfg = text_config(
        text_encoder=encoder,
        text_encoder_kwargs=WORD if encoder == "word" else {},
        autoencoder=str(autoencoder) if space == "latent" else None,
    )
    reference = train(cfg, tmp_path / "reference", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_after=3)  # "killed" after step 3's checkpoint
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    got, want = run_tensors(tmp_path / "resumed"), run_tensors(reference)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"
    assert [r["loss"] for r in log_rows(tmp_path / "resumed")] == [r["loss"] for r in log_rows(reference)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log_rows(reference))

    config = json.loads((reference / "config.json").read_text())
    assert config["text_encoder"]["kind"] == encoder
    assert config["model"]["context_dim"] == (384 if encoder == "minilm" else WORD["dim"])
    assert config["model"]["num_classes"] is None
    assert config["data"]["channels"] == 3 and config["data"]["size"] == 16  # the images, also for latents
    trained_text = [k for k in want if k.startswith(("model.text_encoder.", "ema.text_encoder."))]
    assert bool(trained_text) == (encoder == "word")  # a frozen MiniLM is not saved, a word encoder is
    if space == "latent":
        assert config["model"]["in_channels"] == 4 and config["model"]["image_size"] == 4
        assert config["sigma_data"] == 1.0  # unit-variance latents
        assert (
            config["autoencoder"]["scale_factor"]
            == json.loads((autoencoder / "config.json").read_text())["scale_factor"]
        )
        assert (reference / "autoencoder" / "model.safetensors").is_file()


def test_caption_dropout_rate_measured_in_the_loop(tmp_path, monkeypatch):
    # every context row the network sees is recorded; dropped captions are the empty prompt's row
    seen = []
    forward = loop._LossModule.forward

    def recording(self, x0, sigma, noise, cond):
        seen.append((cond["token_ids"].clone(), cond["context_mask"].clone()))
        return forward(self, x0, sigma, noise, cond)

    monkeypatch.setattr(loop._LossModule, "forward", recording)
    rates = {}
    for p in (None, 0.5):
        seen.clear()
        extra = {} if p is None else {"caption_dropout": p}
        cfg = text_config(
            data_kwargs={"n": 128, "size": 8},
            model_overrides={"channels": 8, "head_channels": 8},
            batch_size=64,
            steps=8,
            **extra,
        )
        train(cfg, tmp_path / f"p{p}", progress=False)
        ids = torch.cat([i for i, _ in seen])
        mask = torch.cat([m for _, m in seen])
        empty = (mask.sum(1) == 1) & (ids[:, 0] == 1)  # "" -> the single token <unk>; captions have >= 5 words
        assert ((mask.sum(1) >= 5) | empty).all()
        rates[p] = empty.double().mean().item()
    # 512 draws each: binomial sd 0.013 at p = 0.1 and 0.022 at p = 0.5
    assert abs(rates[None] - 0.1) < 0.04, rates  # the default is 0.1
    assert abs(rates[0.5] - 0.5) < 0.08, rates


# --------------------------------------------------------------------------------------------
# Sampling from prompts
# --------------------------------------------------------------------------------------------


def _one_step(pipe, **kw):
    """pipe(...) with one Euler step from sigma = 2 to 0: exactly the (guided) x0 estimate D(x_T, 2)."""
    return pipe(2, sampler="euler", sigmas=torch.tensor([2.0, 0.0]), seed=3, **kw)


def test_prompts_change_the_output_and_guidance_follows_s_equals_1_plus_w(word_run):
    pipe = Pipeline.from_pretrained(word_run)
    assert pipe.conditioning == "text"
    a, b = _one_step(pipe, prompt=PROMPT), _one_step(pipe, prompt=OTHER)
    assert torch.equal(a, _one_step(pipe, prompt=PROMPT))
    assert (a - b).abs().max() > 1e-5, "the prompt does not reach the network"
    # CFG: D_u + s (D_c - D_u), with D_u the empty prompt (or the negative prompt)
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3)) * 2.0
    D = pipe.denoiser

    def d(prompt):
        states, mask = pipe.encode_prompts([prompt] * 2)
        return D(x, torch.full((2,), 2.0), context=states, context_mask=mask)

    d_c, d_u, d_neg = d(PROMPT), d(""), d(OTHER)
    torch.testing.assert_close(a, d_c.clamp(-1, 1))
    torch.testing.assert_close(
        _one_step(pipe, prompt=PROMPT, guidance_scale=4.0), (d_u + 4.0 * (d_c - d_u)).clamp(-1, 1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(_one_step(pipe, prompt=PROMPT, guidance_scale=0.0), d_u.clamp(-1, 1))  # w = -1
    torch.testing.assert_close(
        _one_step(pipe, prompt=PROMPT, negative_prompt=OTHER, guidance_scale=4.0),
        (d_neg + 4.0 * (d_c - d_neg)).clamp(-1, 1),
        rtol=1e-5,
        atol=1e-6,
    )
    assert torch.equal(_one_step(pipe, prompt=PROMPT, negative_prompt=OTHER), a)  # s = 1: no unconditional branch
    rescaled = _one_step(pipe, prompt=PROMPT, guidance_scale=4.0, guidance_rescale=1.0)
    guided = d_u + 4.0 * (d_c - d_u)
    want = guided * d_c.std(dim=(1, 2, 3), keepdim=True) / guided.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(rescaled, want.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_latent_run_samples_latents_and_decodes_with_its_copy(tmp_path, autoencoder):
    minilm_or_skip()
    source = shutil.copytree(autoencoder, tmp_path / "ae")
    run = train(
        text_config(text_encoder="minilm", text_encoder_kwargs={}, autoencoder=str(source), steps=2),
        tmp_path / "run",
        progress=False,
    )
    shutil.rmtree(source)  # the run keeps its own copy
    pipe = Pipeline.from_pretrained(run)
    assert pipe.sample_shape() == (4, 4, 4) and pipe.image_shape() == (3, 16, 16)
    images = _one_step(pipe, prompt=PROMPT)
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3)) * 2.0
    states, mask = pipe.encode_prompts([PROMPT] * 2)
    z0 = pipe.denoiser(x, torch.full((2,), 2.0), context=states, context_mask=mask)
    torch.testing.assert_close(images, pipe.latent_space.decode(z0).clamp(-1, 1))
    copy = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    assert torch.equal(_one_step(copy, prompt=PROMPT), images)


def test_word_encoder_weights_round_trip_through_save_pretrained(word_run, tmp_path):
    pipe = Pipeline.from_pretrained(word_run)
    raw = Pipeline.from_pretrained(word_run, weights="raw")
    saved = load_file(str(word_run / "model.safetensors"))
    emb = pipe.text_encoder.embed.weight
    assert torch.equal(emb, saved["text_encoder.embed.weight"])
    assert not torch.equal(emb, raw.text_encoder.embed.weight)  # EMA vs raw weights
    copy = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    assert torch.equal(
        _one_step(copy, prompt=PROMPT, guidance_scale=2.0), _one_step(pipe, prompt=PROMPT, guidance_scale=2.0)
    )


# --------------------------------------------------------------------------------------------
# Older configs, and clear errors
# --------------------------------------------------------------------------------------------


def test_class_conditional_configs_and_checkpoints_of_older_runs_still_work(tiny_run, tmp_path):
    assert TrainConfig.from_dict({"class_conditional": False}).conditioning == "none"
    assert TrainConfig.from_dict({"class_conditional": True}).conditioning == "class"
    assert TrainConfig().conditioning == "class"
    with pytest.raises(ValueError, match="class_conditional=True contradicts conditioning='text'"):
        TrainConfig(class_conditional=True, conditioning="text")
    # a checkpoint written before the conditioning fields existed resumes
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    old = json.loads(meta["config"])
    for key in ("conditioning", "text_encoder", "text_encoder_kwargs", "caption_dropout", "autoencoder", "sigma_data"):
        del old[key]
    old["class_conditional"] = True
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "config": json.dumps(old)})
    train(tiny_config(steps=5), run, resume=True, progress=False)
    assert Pipeline.from_pretrained(run).conditioning == "class"


def test_bad_conditioning_inputs(tmp_path, tiny_run, word_run, autoencoder):
    with pytest.raises(ValueError, match="unknown text_encoder 'clip'; known: minilm, word"):
        train(text_config(text_encoder="clip"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="conditioning must be one of class, text, none, got 'caption'"):
        train(text_config(conditioning="caption"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"text_encoder_kwargs \{'width': 3\} do not fit text encoder 'word'"):
        train(text_config(text_encoder_kwargs={"width": 3}), tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match="autoencoder folder .*nowhere does not exist"):
        train(text_config(autoencoder=str(tmp_path / "nowhere")), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"takes \(3, 16, 16\) images; dataset 'shapes' has \(3, 32, 32\)"):
        train(text_config(autoencoder=str(autoencoder), data_kwargs={"n": 64}), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="conditioning='text' needs captions, and dataset 'digits' has none"):
        train(tiny_config(conditioning="text"), tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="flip=True would contradict captions"):
        train(text_config(flip=True), tmp_path / "e", progress=False)
    with pytest.raises(
        ValueError, match="--resume: conditioning differs from the checkpoint's \\('class' there, 'none' now\\)"
    ):
        train(tiny_config(conditioning="none"), shutil.copytree(tiny_run, tmp_path / "f"), resume=True, progress=False)
    with pytest.raises(ValueError, match="is an autoencoder folder, not a diffusion run"):
        Pipeline.from_pretrained(autoencoder)

    class_pipe, text_pipe = Pipeline.from_pretrained(tiny_run), Pipeline.from_pretrained(word_run)
    with pytest.raises(ValueError, match=r"prompt given, but this model is class-conditional: pass class_labels"):
        class_pipe(1, prompt=PROMPT, steps=2)
    with pytest.raises(ValueError, match="class_labels given, but this model is text-conditional: pass prompt"):
        text_pipe(1, class_labels=2, steps=2)
    with pytest.raises(ValueError, match=r"words \['crimson', 'rhombus'\] are not in this model's vocabulary"):
        text_pipe(1, prompt="a crimson rhombus", steps=2)
    with pytest.raises(ValueError, match="guidance_scale needs a prompt"):
        text_pipe(1, guidance_scale=3.0, steps=2)
    with pytest.raises(ValueError, match=r"guidance_rescale must be a finite number in \[0, 1\], got 1.5"):
        text_pipe(1, prompt=PROMPT, guidance_scale=3.0, guidance_rescale=1.5, steps=2)


def test_prompt_longer_than_the_encoder_takes(word_run):
    pipe = Pipeline.from_pretrained(word_run)
    limit = pipe.text_encoder.max_length
    long = " ".join(["red"] * (limit + 3))
    with pytest.raises(ValueError, match=f"has {limit + 3} words, more than max_length {limit}; .*truncate=True"):
        pipe(1, prompt=long, steps=2)
    assert pipe(1, prompt=long, truncate=True, steps=2).shape == (1, 3, 16, 16)
