"""The conditioning commands: train-autoencoder and train-classifier write loadable folders; a
text-conditional latent run trains and samples from prompts; classifier guidance samples; bad
inputs end with one clear line and exit status 2.

Most commands run in-process through `difflab.cli.main` (a subprocess costs ~1.5 s of imports);
one end-to-end `python -m difflab sample --prompt` runs as a subprocess.
"""

import json

import pytest
import torch

from difflab.cli import build_parser, main
from difflab.nn.autoencoder import load_latent_space
from difflab.nn.classifier import load_classifier
from difflab.pipeline import Pipeline
from difflab.train import train
from tests.train.helpers import (
    SHAPES16,
    difflab_cli,
    make_autoencoder,
    minilm_or_skip,
    one_thread,
    text_config,
    tiny_config,
    write_config,
)

PROMPT = "a red circle on the left"


def _run(capsys, *argv):
    """(exit status, stdout, stderr) of `difflab ARGV` in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and --help
        rc = e.code if isinstance(e.code, int) else 2
        if not isinstance(e.code, int):
            print(e.code, file=__import__("sys").stderr)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _clean_error(result, *fragments):
    rc, _, err = result
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A 3-step text-conditional pixel run with the frozen MiniLM."""
    minilm_or_skip()
    with one_thread():
        return train(
            text_config(text_encoder="minilm", text_encoder_kwargs={}, steps=3),
            tmp_path_factory.mktemp("text") / "run",
            progress=False,
        )


@pytest.mark.parametrize(
    "command, fragments",
    [
        ("train-autoencoder", ["--factor", "--out", "--steps", "--minutes", "--seed", "scale factor"]),
        ("train-classifier", ["--run", "--out", "--steps", "--minutes", "--seed"]),
        (
            "sample",
            ["--prompt", "--negative-prompt", "S = 1 + w", "--guidance-rescale", "--classifier-guidance", "--truncate"],
        ),
        ("train", ["--conditioning", "--text-encoder", "--caption-dropout", "--autoencoder"]),
    ],
)
def test_help_pages(capsys, command, fragments):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_train_autoencoder_then_text_latent_run_then_sample_a_prompt(capsys, tmp_path):
    minilm_or_skip()
    ae = tmp_path / "ae"
    rc, out, err = _run(
        capsys,
        "train-autoencoder",
        "--data",
        "shapes",
        "--data-kwargs",
        json.dumps(SHAPES16),
        "--factor",
        4,
        "--channels",
        8,
        "--steps",
        3,
        "--batch-size",
        16,
        "--seed",
        1,
        "--out",
        ae,
        "--no-progress",
    )
    assert rc == 0, err
    assert "scale_factor" in out
    meta = json.loads((ae / "config.json").read_text())
    assert meta["kind"] == "autoencoder" and meta["model"]["factor"] == 4 and meta["scale_factor"] > 0
    assert meta["info"]["steps"] == 3 and meta["info"]["seed"] == 1
    assert (ae / "reconstructions.png").is_file()
    space = load_latent_space(ae)
    assert space.scale == meta["scale_factor"] and space.latent_shape == (4, 4, 4)

    config = write_config(text_config(text_encoder="minilm", text_encoder_kwargs={}, steps=3), tmp_path / "cfg.json")
    run = tmp_path / "run"
    rc, _, err = _run(
        capsys,
        "train",
        "--config",
        config,
        "--conditioning",
        "text",
        "--text-encoder",
        "minilm",
        "--caption-dropout",
        0.2,
        "--autoencoder",
        ae,
        "--out",
        run,
        "--no-progress",
    )
    assert rc == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["caption_dropout"] == 0.2 and saved["train"]["autoencoder"] == str(ae)
    assert saved["model"]["in_channels"] == 4 and saved["autoencoder"]["scale_factor"] == meta["scale_factor"]

    png = tmp_path / "samples.png"  # end to end: `python -m difflab sample --prompt ...`
    proc = difflab_cli(
        "sample",
        "--run",
        str(run),
        "--prompt",
        PROMPT,
        "--prompt",
        "a blue square at the top",
        "--negative-prompt",
        "a green star",
        "--guidance",
        "3",
        "--guidance-rescale",
        "0.5",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(png),
    )
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 0 and "wrote" in proc.stdout


def test_train_classifier_writes_a_folder_that_guides_sampling(capsys, tmp_path, tiny_run):
    clf_dir = tmp_path / "clf"
    rc, out, err = _run(
        capsys,
        "train-classifier",
        "--data",
        "digits",
        "--run",
        tiny_run,
        "--steps",
        3,
        "--batch-size",
        16,
        "--channels",
        8,
        "--out",
        clf_dir,
        "--no-progress",
    )
    assert rc == 0, err
    assert "test accuracy" in out
    meta = json.loads((clf_dir / "config.json").read_text())
    run_config = json.loads((tiny_run / "config.json").read_text())
    assert meta["kind"] == "classifier" and meta["info"]["steps"] == 3
    assert meta["preconditioning"]["prediction"] == run_config["prediction"]
    assert meta["preconditioning"]["sigma_data"] == run_config["sigma_data"]
    assert load_classifier(clf_dir).config.num_classes == 10

    png = tmp_path / "guided.png"
    rc, _, err = _run(
        capsys,
        "sample",
        "--run",
        tiny_run,
        "--classifier",
        clf_dir,
        "--classifier-guidance",
        2,
        "--label",
        3,
        "--n",
        2,
        "--steps",
        2,
        "--out",
        png,
    )
    assert rc == 0, err
    assert png.is_file()
    # the guidance reaches the samples (scale 0 = none) -- for a class-conditional and an unconditional model
    pipe = Pipeline.from_pretrained(tiny_run)
    kw = dict(class_labels=3, steps=2, seed=0)
    plain = pipe(2, **kw)
    assert torch.equal(pipe(2, classifier=clf_dir, classifier_scale=0.0, **kw), plain)
    assert (pipe(2, classifier=clf_dir, classifier_scale=50.0, **kw) - plain).abs().max() > 1e-4
    uncond = Pipeline.from_pretrained(train(tiny_config(conditioning="none", steps=2), tmp_path / "u", progress=False))
    assert (uncond(2, classifier=clf_dir, classifier_scale=50.0, **kw) - uncond(2, steps=2)).abs().max() > 1e-4

    # a classifier trained on other inputs (here: another sigma_data) is refused by name
    meta["preconditioning"]["sigma_data"] = 0.3
    (clf_dir / "config.json").write_text(json.dumps(meta))
    _clean_error(
        _run(capsys, "sample", "--run", tiny_run, "--classifier", clf_dir, "--classifier-guidance", 2, "--out", png),
        "difflab sample: error: classifier",
        "was trained on the inputs of",
        "sigma_data=0.3",
        "difflab train-classifier --run RUN",
    )


def test_bad_inputs_give_one_clear_line(capsys, tmp_path, tiny_run, text_run):
    png = str(tmp_path / "x.png")
    _clean_error(
        _run(capsys, "sample", "--run", tiny_run, "--prompt", PROMPT, "--out", png),
        "difflab sample: error: prompt given, but this model is class-conditional: pass class_labels=... "
        "(--label) instead",
    )
    _clean_error(
        _run(capsys, "sample", "--run", text_run, "--label", 1, "--out", png),
        "difflab sample: error: class_labels given, but this model is text-conditional",
    )
    long = " ".join(["red"] * 80)
    _clean_error(
        _run(capsys, "sample", "--run", text_run, "--prompt", long, "--n", 1, "--out", png),
        "has 82 tokens, more than the encoder's max_length 77",
        "--truncate",
    )
    rc, _, err = _run(
        capsys, "sample", "--run", text_run, "--prompt", long, "--truncate", "--n", 1, "--steps", 1, "--out", png
    )
    assert rc == 0, err
    _clean_error(
        _run(capsys, "sample", "--run", text_run, "--prompt", PROMPT, "--classifier-guidance", 2, "--out", png),
        "--classifier-guidance SCALE and --classifier FOLDER go together",
    )
    _clean_error(
        _run(
            capsys,
            "sample",
            "--run",
            tiny_run,
            "--classifier",
            tmp_path / "noclf",
            "--classifier-guidance",
            2,
            "--out",
            png,
        ),
        "classifier folder",
        "noclf does not exist",
    )
    assert not (tmp_path / "x.png").exists() or rc == 0

    config = write_config(tiny_config(steps=2), tmp_path / "cfg.json")
    bad = json.loads(config.read_text())
    bad.update(conditioning="text", class_conditional=None, text_encoder="clip")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    _clean_error(
        _run(capsys, "train", "--config", tmp_path / "bad.json", "--out", tmp_path / "r1", "--no-progress"),
        "difflab train: error: unknown text_encoder 'clip'; known: minilm, word",
    )
    _clean_error(
        _run(
            capsys,
            "train",
            "--config",
            config,
            "--data",
            "shapes",
            "--conditioning",
            "text",
            "--autoencoder",
            tmp_path / "no_ae",
            "--out",
            tmp_path / "r2",
            "--no-progress",
        ),
        "difflab train: error: autoencoder folder",
        "no_ae does not exist",
        "difflab train-autoencoder --out",
    )
    _clean_error(
        _run(capsys, "train", "--config", config, "--conditioning", "text", "--out", tmp_path / "r3", "--no-progress"),
        "difflab train: error: conditioning='text' needs captions, and dataset 'digits' has none",
    )
    _clean_error(
        _run(capsys, "train", "--config", config, "--text-encoder", "word", "--out", tmp_path / "r4"),
        "--text-encoder needs --conditioning text",
    )
    _clean_error(
        _run(
            capsys, "train", "--config", config, "--unconditional", "--conditioning", "text", "--out", tmp_path / "r5"
        ),
        "--unconditional contradicts --conditioning text",
    )
    _clean_error(
        _run(capsys, "train-autoencoder", "--data-kwargs", "{n: 3}", "--out", tmp_path / "ae"),
        "difflab train-autoencoder: error: --data-kwargs is not valid JSON",
    )
    _clean_error(
        _run(capsys, "train-autoencoder", "--data", "digits", "--factor", 3, "--out", tmp_path / "ae"),
        "factor must be a power of 2, got 3",
    )
    _clean_error(
        _run(capsys, "train-classifier", "--data", "folder:/nowhere", "--out", tmp_path / "c"),
        "difflab train-classifier: error:",
    )
    ae = make_autoencoder(tmp_path / "ae16")
    _clean_error(_run(capsys, "sample", "--run", ae, "--out", png), "is an autoencoder folder, not a diffusion run")
    _clean_error(
        _run(capsys, "train-classifier", "--data", "digits", "--run", text_run, "--out", tmp_path / "c2"),
        "run",
        "makes 3x16x16 images; dataset 'digits' has (1, 16, 16)",
    )
