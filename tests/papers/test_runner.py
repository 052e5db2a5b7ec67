"""papers/runner.py: the one runner every paper's experiment plugs into.

A toy paper checks parts, --quick, --only, --report, merged parts, skipped parts and the locked
results.json (two processes writing at once lose nothing); every papers/*/run.py declares its
PAPER with the runner's flags.
"""

import importlib
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from papers.runner import PAPERS_DIR, SKIPPED, Paper, Results, main, timing

CALLS: list[str] = []


def _toy_paper() -> Paper:
    def part_a(run):
        CALLS.append("a")
        return {"n": run.settings["n"], "seed": run.seed}

    def part_b(run):
        CALLS.append("b")
        return {f"x{run.settings['n']}": 1}

    def part_c(run):
        CALLS.append("c")
        return SKIPPED

    def report(run):
        res = run.results.load()
        (run.out / "report.md").write_text(f"a: {res.get('a')}; b: {sorted(res.get('b', {}))}\n")

    return Paper(
        "toy",
        "A toy paper.",
        parts={"a": part_a, "b": part_b, "c": part_c},
        report=report,
        full={"n": 100},
        quick={"n": 2},
        merge=("b",),
    )


def test_parts_quick_only_report_merge_and_skip(tmp_path):
    paper = _toy_paper()
    CALLS.clear()
    run = main(paper, ["--quick", "--out", str(tmp_path), "--seed", "3"])
    assert CALLS == ["a", "b", "c"] and run.settings == {"n": 2}
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["a"] == {"n": 2, "seed": 3} and res["b"] == {"x2": 1} and "c" not in res
    assert set(res["runs"]) == {"a", "b", "machine"} and res["runs"]["a"]["cpu_s"] >= 0
    assert (tmp_path / "report.md").read_text() == "a: {'n': 2, 'seed': 3}; b: ['x2']\n"

    CALLS.clear()
    main(paper, ["--out", str(tmp_path), "--only", "b"])  # full settings, one part: merged into b, a kept
    res = Results(tmp_path).load()
    assert CALLS == ["b"] and res["b"] == {"x2": 1, "x100": 1} and res["a"]["n"] == 2

    CALLS.clear()
    (tmp_path / "report.md").unlink()
    main(paper, ["--out", str(tmp_path), "--report"])
    assert CALLS == [] and (tmp_path / "report.md").exists()
    assert list(timing(res, paper.parts)["parts"]) == ["a", "b"]
    with pytest.raises(SystemExit):
        main(paper, ["--out", str(tmp_path), "--only", "nope"])


def _writer(out: str, who: int) -> None:
    for i in range(40):
        Results(Path(out)).save_entry("part", f"{who}-{i}", {"i": i})


def test_two_processes_writing_results_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(Results(tmp_path).load()["part"]) == 80
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_every_paper_declares_itself_to_the_runner():
    folders = sorted(p.parent.name for p in PAPERS_DIR.glob("*/run.py"))
    assert folders == [
        "adm",
        "asyrp",
        "ddim",
        "ddpm",
        "diffusionclip",
        "dit",
        "dreambooth",
        "editing",
        "guidance",
        "imagic",
        "sdg",
        "text2image",
        "text_editing",
        "textual_inversion",
        "theory",
        "unitune",
    ]
    for name in folders:
        paper = importlib.import_module(f"papers.{name}.run").PAPER
        assert paper.name == name and paper.folder == PAPERS_DIR / name and paper.parts
        ns = paper.parser().parse_args(["--quick", "--only", next(iter(paper.parts))])
        assert ns.quick and ns.only == [next(iter(paper.parts))]
        assert (paper.folder / "results.json").exists() and (paper.folder / "report.md").exists()


def test_device_and_dtype_reach_the_pipelines_a_paper_loads(tmp_path):
    import torch

    from papers.runner import load_pipeline

    seen = {}

    def part(run):
        pipe = load_pipeline("digits-unet-s")
        seen["dtype"] = next(pipe.denoiser.net.parameters()).dtype
        x = torch.randn(2, 1, 16, 16)  # paper code keeps CPU float32 tensors: the denoiser handles the rest
        seen["out"] = pipe.denoiser(x, torch.tensor([1.0, 1.0])).dtype
        return {"ok": 1}

    paper = Paper("dev", "A paper that loads a pipeline.", parts={"p": part}, report=lambda run: None)
    main(paper, ["--out", str(tmp_path), "--device", "cpu", "--dtype", "bf16", "--no-report"])
    assert seen == {"dtype": torch.bfloat16, "out": torch.float32}
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert "pipelines on cpu in torch.bfloat16" in runs["machine"]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        main(paper, ["--out", str(tmp_path), "--device", "tpu"])


def test_train_cached_reuses_a_finished_run_resumes_an_unfinished_one_and_retrains_a_changed_one(tmp_path):
    import torch

    from papers.runner import train_cached

    from difflab.train import TrainConfig

    def cfg(steps, lr=1e-3):
        return TrainConfig(
            data="digits", model="unet-xs", steps=steps, batch_size=8, save_every=1, log_every=1, warmup=1, lr=lr
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path / "run"
        first = train_cached(cfg(2), folder)
        assert first["steps"] == 2
        log = (folder / "log.jsonl").read_text()
        assert train_cached(cfg(2), folder) == first and (folder / "log.jsonl").read_text() == log  # reused
        more = train_cached(cfg(3), folder)  # a longer budget: resumed from the checkpoint, not restarted
        rows = [json.loads(r) for r in (folder / "log.jsonl").read_text().splitlines() if r.strip()]
        assert more["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
        other = train_cached(cfg(2, lr=5e-4), tmp_path / "other")  # another config: its own run
        assert (
            other["steps"] == 2 and json.loads((tmp_path / "other" / "config.json").read_text())["train"]["lr"] == 5e-4
        )
    finally:
        torch.set_num_threads(threads)
