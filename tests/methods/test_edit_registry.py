"""The editing registry: each method module exports its entry, the CLI and `edit` are built from it.

Checks that can fail: every module that defines an editor is registered; every knob's default
passes its own range check and every bound is enforced by the API and the CLI alike; the CLI's
flags and defaults are exactly the entry's knobs; and an entry added at run time becomes a
working `difflab edit` subcommand without touching difflab/edit.py.
"""

import argparse
import ast
import math
from pathlib import Path

import pytest
import torch

import difflab.methods as methods_pkg
from difflab.cli import main
from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.edit import add_edit_parser, edit
from difflab.methods.editing import EDIT_METHODS, edit_method
from difflab.pipeline import Pipeline


def _modules_defining_edit() -> set[str]:
    """Modules of difflab/methods/ with a top-level `EDIT = ...` (read from the source, not imported)."""
    found = set()
    for path in Path(methods_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EDIT" for t in node.targets):
                found.add(path.stem)
    return found


def test_every_module_that_exports_an_editor_is_registered():
    registered = {m.run.__module__.rsplit(".", 1)[1] for m in EDIT_METHODS.values()}
    assert _modules_defining_edit() == registered
    assert set(EDIT_METHODS) == {
        "sdedit",
        "ilvr",
        "repaint",
        "blended",
        "diffedit",
        "p2p",
        "imagic",
        "unitune",
        "diffusionclip",
        "asyrp",
    }
    with pytest.raises(ValueError, match="unknown edit method 'nope'; known: sdedit, ilvr"):
        edit_method("nope")


@pytest.mark.parametrize("name", list(EDIT_METHODS))
def test_defaults_pass_their_checks_and_every_bound_is_enforced(name):
    spec = EDIT_METHODS[name]
    assert spec.knob_values({}) == spec.defaults()
    for knob in spec.knobs:
        if knob.choices is not None:
            assert knob.default in knob.choices
            with pytest.raises(ValueError, match=rf"{name} {knob.name} must be one of"):
                spec.knob_values({knob.name: "not-a-choice"})
            continue
        if knob.type not in (int, float):
            continue
        bad = [math.nan, math.inf]
        if knob.lo is not None:
            bad.append(knob.lo if knob.lo_open else knob.lo - 1)
        if knob.hi is not None:
            bad.append(knob.hi if knob.hi_open else knob.hi + 1)
        if knob.type is int:
            bad.append(1.5)
        for value in bad:
            with pytest.raises(ValueError, match=rf"{name} {knob.name} must be"):
                spec.knob_values({knob.name: value})
    with pytest.raises(ValueError, match=rf"{name} has no parameter\(s\) \['no_such_knob'\]"):
        spec.knob_values({"no_such_knob": 1})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", exit_on_error=False)
    add_edit_parser(parser.add_subparsers(dest="command"))
    return parser


def _required(spec: EditMethod) -> list[str]:
    args = ["--run", "R", "--image", "I", "--out", "O.png"]
    if spec.mask == "required":
        args += ["--mask", "M"]
    if spec.prompt in ("text", "required"):
        args += ["--prompt", "p"]
    if spec.prompt == "text":
        args += ["--clip", "C"]
    if spec.source_prompt == "required":
        args += ["--source-prompt", "s"]
    return args


@pytest.mark.parametrize("name", list(EDIT_METHODS))
def test_cli_flags_are_the_entry_knobs(name, capsys):
    spec = EDIT_METHODS[name]
    parser = _parser()
    ns = parser.parse_args(["edit", name, *_required(spec)])
    assert {k: getattr(ns, k) for k in spec.defaults()} == spec.defaults()
    help_text = (
        parser._subparsers._group_actions[0].choices["edit"]._subparsers._group_actions[0].choices[name].format_help()
    )
    for knob in spec.knobs:
        assert "--" + knob.name.replace("_", "-") in help_text
    numeric = [k for k in spec.knobs if k.type in (int, float) and (k.lo is not None or k.hi is not None)]
    for knob in numeric:  # out of range on the command line: argparse's one-line error, exit 2
        value = (
            knob.lo if knob.lo is not None and knob.lo_open else (knob.lo - 1 if knob.lo is not None else knob.hi + 1)
        )
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["edit", name, *_required(spec), "--" + knob.name.replace("_", "-"), str(value)])
        assert exc.value.code == 2
        assert "--" + knob.name.replace("_", "-") in capsys.readouterr().err


def _negate_inside(ctx: EditContext, *, amount: float) -> torch.Tensor:
    """A toy editor: inside the mask, x -> -amount * x; its strip gets one extra tile."""
    ctx.tiles.append(("toy tile", ctx.image))
    ctx.info["toy"] = amount
    return ctx.mask * (-amount * ctx.image) + (1 - ctx.mask) * ctx.image


TOY = EditMethod(
    "toy",
    "Toy negation (tests)",
    "Negate the white region.",
    mask="required",
    mask_keeps="black",
    prompt="none",
    source_prompt="none",
    sampler=None,
    knobs=(Knob("amount", 1.0, "scale of the negation", lo=0.0, hi=2.0),),
    run=_negate_inside,
)


def test_a_registered_entry_becomes_a_subcommand(monkeypatch, tiny_run, tmp_path, capsys):
    from difflab.data import save_image_grid

    monkeypatch.setitem(EDIT_METHODS, "toy", TOY)
    pipe = Pipeline.from_pretrained(tiny_run)
    C, H, W = pipe.image_shape()
    image = torch.linspace(-1, 1, H * W).reshape(1, 1, H, W).expand(1, C, H, W).contiguous()
    mask = torch.zeros(1, 1, H, W)
    mask[..., : H // 2, :] = 1
    result = edit(pipe, "toy", image, mask=mask, amount=0.5)
    torch.testing.assert_close(result.output[..., : H // 2, :], -0.5 * image[..., : H // 2, :])
    assert torch.equal(result.output[..., H // 2 :, :], image[..., H // 2 :, :])
    assert [c for c, _ in result.tiles] == ["input", "mask: white = edit", "toy tile", "output"]
    assert result.info["toy"] == 0.5 and result.info["sampler"] == "own"

    save_image_grid(image, tmp_path / "in.png", nrow=1, padding=0)
    save_image_grid(mask * 2 - 1, tmp_path / "mask.png", nrow=1, padding=0)
    out = tmp_path / "out.png"
    args = ["edit", "toy", "--run", str(tiny_run), "--image", str(tmp_path / "in.png")]
    args += ["--mask", str(tmp_path / "mask.png"), "--out", str(out)]
    assert main([*args, "--amount", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Toy negation (tests)" in printed and "toy mask: white = edit, black = keep the input" in printed
    assert out.exists() and out.with_name("out_strip.png").exists()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--amount", "3"])
    assert exc.value.code == 2
    assert "--amount: must be a finite number in [0, 2], got '3'" in capsys.readouterr().err


def test_prompts_become_the_models_cond_in_one_place(tiny_run):
    pipe = Pipeline.from_pretrained(tiny_run)  # class-conditional digits with label dropout
    assert torch.equal(pipe.cond("3")["class_labels"], torch.tensor([3]))
    assert torch.equal(pipe.cond("")["class_labels"], torch.tensor([-1]))
    assert torch.equal(pipe.cond(None)["class_labels"], pipe.null_cond("x")["class_labels"])
    with pytest.raises(ValueError, match=r"--prompt 'ten' names no class of this run; known: .*an index 0..9"):
        pipe.cond("ten", "--prompt")
    with pytest.raises(ValueError, match="prompt given, but this model is class-conditional"):
        pipe.token_ids("a")
