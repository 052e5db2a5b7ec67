"""Non-finite numbers never give exit 0: every numeric flag of every command refuses nan and inf
with one line and exit 2; the Python API refuses them too; a training whose weights blow up stops
naming the step and leaves the last good checkpoint untouched."""

import argparse
import hashlib
import json
import math
import shutil

import pytest
import torch

from difflab.cli import build_parser, main
from difflab.pipeline import Pipeline
from difflab.train import TrainConfig, train
from tests.train.helpers import tiny_config


def _numeric_flags():
    """(command words, flag) for every option whose value is a number, over all (sub)commands."""
    out = []

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + [name])
            elif action.option_strings and action.type is not None and action.type not in (str,):
                out.append((tuple(words), action.option_strings[0], action.type))

    walk(build_parser(), [])
    return out


FLAGS = _numeric_flags()


def test_no_numeric_flag_takes_a_bare_int_or_float():
    """Plain int/float accept nan and inf ('nan' is a float); every numeric flag uses a checked type."""
    raw = [(" ".join(w), f) for w, f, t in FLAGS if t in (int, float)]
    assert not raw, raw
    assert len(FLAGS) > 50


CASES = [(w, f, "nan") for w, f, _ in FLAGS] + [(w, f, v) for w, f, _ in FLAGS[:8] for v in ("inf", "-inf")]


@pytest.mark.parametrize("words, flag, value", CASES, ids=[" ".join(w) + f" {f}={v}" for w, f, v in CASES])
def test_every_numeric_flag_refuses_non_finite_with_exit_2(words, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*words, f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: argument {flag}" in err[-1] and ": must be " in err[-1] and err[-1].endswith(f"got '{value}'")
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"lr": math.inf}, r"lr must be a finite number in \(0, 1\]"),
        ({"lr": 0.0}, r"lr must be a finite number in \(0, 1\]"),
        ({"lr": 1e38}, r"lr must be a finite number in \(0, 1\]"),
        ({"steps": None, "minutes": math.nan}, "minutes must be a finite number > 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"p_std": math.nan}, "p_std must be a finite number > 0"),
        ({"grad_clip": math.inf}, "grad_clip must be a finite number >= 0"),
        ({"sigma_data": -1.0}, "sigma_data must be a finite number > 0"),
    ],
)
def test_train_config_refuses_bad_numbers_before_any_work(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(tiny_config(**change), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"guidance_scale": math.nan}, "guidance_scale must be a finite number"),
        ({"guidance_scale": math.inf}, "guidance_scale must be a finite number"),
        ({"guidance_rescale": math.nan}, r"guidance_rescale must be a finite number in \[0, 1\]"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"n": 2.5}, "n must be an integer >= 1"),
        ({"classifier_scale": math.inf}, "classifier_scale must be a finite number"),
    ],
)
def test_pipeline_refuses_bad_numbers(tiny_run, kw, match):
    pipe = Pipeline.from_pretrained(tiny_run)
    with pytest.raises(ValueError, match=match):
        pipe(**{"n": 2, "steps": 2, **kw})


def test_edit_api_refuses_a_nan_strength(tiny_run):
    from difflab.edit import edit

    pipe = Pipeline.from_pretrained(tiny_run)
    image = torch.zeros(1, *pipe.image_shape())
    with pytest.raises(ValueError, match=r"sdedit strength must be a finite number in \(0, 1\], got nan"):
        edit(pipe, "sdedit", image, strength=math.nan, steps=2)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("save_every", [0, 1])
def test_training_that_blows_up_stops_at_the_step_and_keeps_the_last_good_checkpoint(
    tiny_run, tmp_path, capsys, monkeypatch, save_every
):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # 3 good steps, saved
    before = {name: _digest(run / name) for name in ("checkpoint.safetensors", "model.safetensors", "config.json")}
    # a fault: the optimizer's second step of this call (step 5) leaves a NaN weight behind a finite loss
    real_step, calls = torch.optim.AdamW.step, []

    def faulty_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][3].data.view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", faulty_step)
    code = main(
        [
            "train",
            "--config",
            str(_config_file(tmp_path, save_every=save_every)),
            "--out",
            str(run),
            "--resume",
            "--steps",
            "8",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "weights became NaN/inf after the optimizer step 5 (tensor 3 of" in err and "last good state" in err
    if save_every == 0:  # nothing saved since step 3: the folder is byte for byte what it was
        assert {name: _digest(run / name) for name in before} == before
    else:  # step 4 was saved and is the folder's state; step 5 never reached the disk
        assert json.loads((run / "config.json").read_text())["saved_step"] == 4
        assert _step(run / "checkpoint.safetensors") == "4"
    weights = Pipeline.from_pretrained(run).denoiser.net.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights if w.dtype.is_floating_point)


def _step(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["step"]


def _config_file(tmp_path, **change):
    import dataclasses
    import json

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(dataclasses.asdict(tiny_config(**change))))
    return path


def test_train_config_api_accepts_the_defaults():
    TrainConfig().validate()
