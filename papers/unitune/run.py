"""UniTune (Valevski et al. 2022, arXiv 2210.09477): one image edited by a text without a mask, through
a model fine-tuned on that image under a rare token, against SDEdit with the same text.

The setting is papers/imagic's (the same base, the same inputs and edits, the same scores): the zoo's
shapes-text-unet, rendered shapes whose colour (even inputs) or shape (odd ones) is edited, a target
text that names only the new shape and colour ("a green star"), so that size, position and
background must come from the input. `difflab.methods.unitune` runs with its defaults (128 steps at
1e-4, batch 4, identifier "sks", classifier-free guidance 3, no blend); its edit is SDEdit (ancestral,
20 steps) from t0 under "sks a green star" with the fine-tuned copy. The baseline is SDEdit with the
untouched model under "a green star", over the same t0 grid and noise.

    python papers/unitune/run.py            # ~15 CPU-minutes (one thread)
    python papers/unitune/run.py --quick    # plumbing check, written to _quick/
    python papers/unitune/run.py --report   # rebuild report.md from results.json

Scores as papers/imagic's: success (the edited attribute reads as the target), kept (the other four
read as the input's), right (both), ideal MSE (against the renderer's ideal edit); standard errors over
inputs.

Parts:
  sweep    n_images inputs (seed): UniTune and SDEdit at t0 0.2, 0.3, ..., 1; each method's best t0 by
           the right rate.
  confirm  n_images fresh inputs (seed + 1): UniTune against SDEdit, each at its sweep-chosen t0,
           paired per input.

Verdict rules, fixed before the first run: (1) "UniTune keeps more at matched edit success" holds if,
at the sweep's t0 where UniTune's success is highest (the lowest such t0 on ties), its kept rate exceeds
SDEdit's kept at the lowest t0 whose success is at least as high by 2 SE; (2) UniTune beats SDEdit if,
on the confirm inputs, the mean paired difference of per-input right rates exceeds 2 SE of those
differences.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/unitune/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.imagic.run import BASE, Scorer, _best, _gt, _row, _summary, make_cases  # noqa: E402
from papers.runner import (  # noqa: E402
    Paper,
    Results,
    Run,
    atomic_write_text,
    cpu_seconds,
    image_rows,
    key,
    load_pipeline,
    log,
    main,
    pm,
    report_head,
    save_figure,
    timing,
)

from difflab.core.guidance import cfg  # noqa: E402
from difflab.core.sampling import edit_sigmas  # noqa: E402
from difflab.data.shapes import render  # noqa: E402
from difflab.methods.sdedit import sdedit  # noqa: E402
from difflab.methods.unitune import unitune_edit, unitune_fit  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
IDENTIFIER = "sks"
FULL = {
    "n_images": 8,
    "n_seeds": 4,
    "steps": 20,
    "guidance": 3.0,
    "tune_steps": 128,
    "tune_lr": 1e-4,
    "batch": 4,
    "blend": 0.0,
    "t0s": [round(0.1 * i, 1) for i in range(2, 11)],
}
QUICK = {**FULL, "n_images": 2, "n_seeds": 2, "steps": 4, "tune_steps": 2, "t0s": [0.5, 1.0]}


def _evaluate(run: Run, cases: list[dict], t0s_unitune: list[float], t0s_sdedit: list[float], tag: str) -> dict:
    st = run.settings
    pipe = load_pipeline(BASE)
    score = Scorer()
    uncond = pipe.cond("")
    sd_D = cfg(st["guidance"], uncond)(pipe.denoiser)
    un_scores = {t: [] for t in t0s_unitune}
    sd_scores = {t: [] for t in t0s_sdedit}
    fit_seconds, strips = [], {}
    for i, case in enumerate(cases):
        t = time.perf_counter()
        x = render(case["src"])[None]
        c0 = cpu_seconds()
        tuned, _ = unitune_fit(
            pipe.denoiser,
            x,
            pipe.cond(IDENTIFIER),
            steps=st["tune_steps"],
            lr=st["tune_lr"],
            batch=st["batch"],
            generator=torch.Generator().manual_seed(run.seed * 1000 + i),
        )
        fit_seconds.append(cpu_seconds() - c0)
        strips[i] = {"unitune": {}, "sdedit": {}}
        with torch.no_grad():
            for t0 in sorted(set(t0s_unitune) | set(t0s_sdedit)):
                tail = edit_sigmas(pipe.denoiser.schedule, t0, st["steps"])
                noise = lambda s: torch.Generator().manual_seed(10_000 + s)  # noqa: E731
                if t0 in un_scores:
                    out = torch.cat([
                        unitune_edit(tuned, x, tail, pipe.cond(f"{IDENTIFIER} {case['text']}"), uncond=uncond,
                                     guidance_scale=st["guidance"], blend=st["blend"], noise=noise(s))
                        for s in range(st["n_seeds"])
                    ])  # fmt: skip
                    un_scores[t0].append(score(out, case))
                    strips[i]["unitune"][key(t0)] = out[0]
                if t0 in sd_scores:
                    out = torch.cat([
                        sdedit(sd_D, x, tail, strength=1.0, cond=pipe.cond(case["text"]), noise=noise(s))
                        for s in range(st["n_seeds"])
                    ])  # fmt: skip
                    sd_scores[t0].append(score(out, case))
                    strips[i]["sdedit"][key(t0)] = out[0]
        log(f"{tag} {i + 1}/{len(cases)} '{case['text']}' ({case['edit']} edit) in {time.perf_counter() - t:.0f} s")
    torch.save(strips, run.cache(f"{tag}_strips.pt"))
    return {
        "cases": cases,
        "unitune": {key(t): _summary(v) for t, v in un_scores.items()},
        "sdedit": {key(t): _summary(v) for t, v in sd_scores.items()},
        "fit_cpu_s": round(sum(fit_seconds) / len(fit_seconds), 1),
        "settings": st,
    }


def part_sweep(run: Run) -> dict:
    pipe = load_pipeline(BASE)
    cases = make_cases(pipe, run.settings["n_images"], run.seed)
    res = _evaluate(run, cases, run.settings["t0s"], run.settings["t0s"], "sweep")
    res["best_unitune"], res["best_sdedit"] = _best(res["unitune"]), _best(res["sdedit"])
    return res


def part_confirm(run: Run) -> dict:
    sweep = run.results.load().get("sweep")
    if sweep is None:
        raise ValueError("part confirm needs the sweep's best settings: run --only sweep first")
    pipe = load_pipeline(BASE)
    cases = make_cases(pipe, run.settings["n_images"], run.seed + 1)
    a_t, b_t = float(sweep["best_unitune"]), float(sweep["best_sdedit"])
    res = _evaluate(run, cases, [a_t], [b_t], "confirm")
    a = torch.tensor(res["unitune"][key(a_t)]["right_per_input"])
    b = torch.tensor(res["sdedit"][key(b_t)]["right_per_input"])
    d = a - b
    res["t0_unitune"], res["t0_sdedit"] = key(a_t), key(b_t)
    res["diff"] = round(float(d.mean()), 4)
    res["diff_se"] = round(float(d.std() / len(d) ** 0.5), 4)
    return res


def _matched(sweep: dict) -> tuple[str, str | None]:
    """UniTune's t0 of highest success (lowest on ties) and SDEdit's lowest t0 reaching that success."""
    un, sd = sweep["unitune"], sweep["sdedit"]
    top = max(r["success"] for r in un.values())
    t_un = min((k for k, r in un.items() if r["success"] == top), key=float)
    reach = [k for k, r in sd.items() if r["success"] >= top]
    return t_un, (min(reach, key=float) if reach else None)


def _claims(sweep: dict | None, conf: dict | None) -> list[str]:
    L = []
    if sweep:
        t_un, t_sd = _matched(sweep)
        a = sweep["unitune"][t_un]
        if t_sd is None:
            L.append(
                f"- **UniTune keeps more of the input at matched edit success.** UniTune's highest success "
                f"{pm(a['success'], a['success_se'], 2)} (t0 {t_un}, kept {pm(a['kept'], a['kept_se'], 2)}) is above "
                "every SDEdit t0's: SDEdit never matches it, so the rule compares nothing: **does not hold** as "
                "stated (rule 1; UniTune's success is unmatched)."
            )
        else:
            b = sweep["sdedit"][t_sd]
            ok = _gt(a, b, "kept")
            L.append(
                f"- **UniTune keeps more of the input at matched edit success.** UniTune at t0 {t_un}: success "
                f"{pm(a['success'], a['success_se'], 2)}, kept {pm(a['kept'], a['kept_se'], 2)}; SDEdit at t0 {t_sd} (its "
                f"lowest t0 with at least that success): success {pm(b['success'], b['success_se'], 2)}, kept "
                f"{pm(b['kept'], b['kept_se'], 2)}: **{'holds' if ok else 'does not hold'}** (rule 1, read off the sweep)."
            )
    if conf:
        a, b = conf["unitune"][conf["t0_unitune"]], conf["sdedit"][conf["t0_sdedit"]]
        beats = conf["diff"] > 2 * conf["diff_se"]
        L.append(
            f"- **UniTune edits better than SDEdit without a mask.** On {len(conf['cases'])} fresh inputs, each at its "
            f"sweep-chosen t0 (UniTune {conf['t0_unitune']}, SDEdit {conf['t0_sdedit']}): right rate "
            f"{pm(a['right'], a['right_se'], 2)} against {pm(b['right'], b['right_se'], 2)}, paired difference "
            f"{pm(conf['diff'], conf['diff_se'], 2)}: **{'holds' if beats else 'does not hold'}** (rule 2)."
        )
    return L


def _figures(sweep: dict) -> list[str]:
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, label in (("unitune", "UniTune over t0"), ("sdedit", "SDEdit over t0")):
        rows = sweep[name]
        ax.plot([rows[k]["success"] for k in rows], [rows[k]["kept"] for k in rows], "o-", label=label)
        for k in rows:
            ax.annotate(k, (rows[k]["success"], rows[k]["kept"]), fontsize=6)
    ax.set_xlabel("edit success (target attribute)")
    ax.set_ylabel("kept (the other four attributes)")
    ax.legend(fontsize=7)
    ax.set_title("the trade-off over t0 (sweep inputs)", fontsize=9)
    save_figure(fig, OUT / "figures" / "tradeoff.png", dpi=110)
    lines = ["![success against kept over t0, UniTune and SDEdit](figures/tradeoff.png)\n"]
    strip_file = OUT / "cache" / "sweep_strips.pt"
    if strip_file.exists():
        strips = torch.load(strip_file, weights_only=True)
        cases = sweep["cases"]
        rows = {"input": torch.stack([render(c["src"]) for c in cases])}
        for k in [k for k in ("0.5", "0.7", "0.9") if k in sweep["unitune"]]:
            rows[f"UniTune t0 {k}"] = torch.stack([strips[i]["unitune"][k] for i in range(len(cases))])
            rows[f"SDEdit t0 {k}"] = torch.stack([strips[i]["sdedit"][k] for i in range(len(cases))])
        rows["ideal edit"] = torch.stack([render(c["tgt"]) for c in cases])
        image_rows(rows, OUT / "figures" / "edits.png", "; ".join(c["text"] for c in cases[:4]) + " ...")
        lines.append("![the sweep's inputs, UniTune and SDEdit over t0, the ideal edit](figures/edits.png)\n")
    return lines


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    L = report_head("UniTune (Valevski et al. 2022)", "unitune", __doc__)
    sweep, conf = res.get("sweep"), res.get("confirm")
    L += ["## Claims, measured\n", *_claims(sweep, conf), ""]
    if sweep:
        st = sweep["settings"]
        L.append(
            f"## 1. Sweep ({st['n_images']} inputs x {st['n_seeds']} generations; UniTune's fine-tuning takes "
            f"{sweep['fit_cpu_s']:.0f} CPU-s per input)\n"
        )
        L += ["| setting | success | kept | right | ideal MSE |", "|---|---|---|---|---|"]
        L += [f"| UniTune t0 {k} | {_row(r)} |" for k, r in sweep["unitune"].items()]
        L += [f"| SDEdit t0 {k} | {_row(r)} |" for k, r in sweep["sdedit"].items()]
        L.append("")
        L.append(f"Best t0 by the right rate: UniTune {sweep['best_unitune']}, SDEdit {sweep['best_sdedit']}.\n")
        L += _figures(sweep)
    if conf:
        a, b = conf["unitune"][conf["t0_unitune"]], conf["sdedit"][conf["t0_sdedit"]]
        L.append(f"## 2. Confirmation on {len(conf['cases'])} fresh inputs (seed + 1)\n")
        L += ["| method | success | kept | right | ideal MSE |", "|---|---|---|---|---|"]
        L.append(f"| UniTune t0 {conf['t0_unitune']} | {_row(a)} |")
        L.append(f"| SDEdit t0 {conf['t0_sdedit']} | {_row(b)} |")
        L.append("")
    meta = timing(res, ("sweep", "confirm"))
    if meta:
        L.append(f"Time: {meta['cpu_min']:.1f} CPU-minutes ({res.get('runs', {}).get('machine', '')}).\n")
    atomic_write_text(OUT / "report.md", "\n".join(L) + "\n")


def configure(run: Run) -> None:
    global OUT
    OUT = run.out


PAPER = Paper(
    "unitune",
    __doc__,
    title="UniTune (Valevski et al. 2022)",
    claim="A model fine-tuned on one image under a rare token edits it by text from a partly noised start, "
    "keeping what the text does not change without a mask.",
    parts={"sweep": part_sweep, "confirm": part_confirm},
    report=write_report,
    full=FULL,
    quick=QUICK,
    configure=configure,
)


if __name__ == "__main__":
    main(PAPER)
