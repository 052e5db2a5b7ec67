"""Numbers are checked where they enter: check_number, the argparse types, the sampler's output."""

import argparse
import math

import pytest
import torch

from difflab.core import sample, sigmas_karras
from difflab.core.validation import check_budget, check_number, check_training_state, number_arg


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_check_number_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        check_number("guidance_scale", value)


@pytest.mark.parametrize("value, ok", [(0.0, False), (1e-12, True), (1.0, True), (1.5, False)])
def test_check_number_bounds(value, ok):
    if ok:
        assert check_number("x", value, lo=0, lo_open=True, hi=1) == value
    else:
        with pytest.raises(ValueError, match=r"x must be a finite number in \(0, 1\]"):
            check_number("x", value, lo=0, lo_open=True, hi=1)


def test_integers_are_integers():
    assert check_number("steps", 3, lo=1, integer=True) == 3
    for bad in (0, 2.0, -1):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            check_number("steps", bad, lo=1, integer=True)


def test_budget_needs_one_positive_finite_part():
    check_budget(10, None)
    check_budget(None, 0.5)
    for steps, minutes in ((None, None), (0, None), (None, math.nan), (None, 0.0), (5, math.inf)):
        with pytest.raises(ValueError):
            check_budget(steps, minutes)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "abc", "0"])
def test_number_arg_is_an_argparse_error(text, capsys):
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--lr", type=number_arg(lo=0, lo_open=True))
    with pytest.raises(SystemExit) as e:
        p.parse_args([f"--lr={text}"])
    assert e.value.code == 2
    assert f"argument --lr: must be a finite number > 0, got '{text}'" in capsys.readouterr().err


def test_training_state_check_names_the_step_and_the_tensor():
    good = [torch.ones(3), torch.zeros(2, 2)]
    check_training_state(5, 0.1, good)
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        check_training_state(5, math.nan, good)
    bad = [torch.ones(3), torch.tensor([[0.0, math.inf], [1.0, 2.0]])]
    with pytest.raises(FloatingPointError, match=r"after the optimizer step 7 \(tensor 1 of 2, shape \(2, 2\)\)"):
        check_training_state(7, 0.1, bad)


def test_sampler_output_that_is_not_finite_is_an_error_not_a_black_image():
    def nan_after_first_call(x, sigma, **cond):
        return torch.full_like(x, math.nan) if sigma.max() < 10 else torch.zeros_like(x)

    x = torch.randn(4, 2, dtype=torch.float64) * 80
    with pytest.raises(
        FloatingPointError, match=r"the sampler's output has 8 NaN/inf value\(s\) of 8 \(euler, 5 steps\)"
    ):
        sample(nan_after_first_call, x, sigmas_karras(5, 0.01, 80.0), method="euler")
