"""Imagic (Kawar et al. 2023, arXiv 2210.09276): one real image edited by a text, through an optimised
embedding and a model fine-tuned on that image, against SDEdit with the same text.

The base is the zoo's shapes-text-unet (MiniLM text encoder, 32 x 32 pixels). Each input is a rendered
shape (a trained shape-colour pair, every size, position and background); its edit changes the colour
(even inputs) or the shape (odd ones) to another trained pair, and the target text names only the new
shape and colour ("a green star"): size, position and background must come from the input, since the
text leaves them open (the base draws "a green star" mostly at the top, half of them on either
background). `difflab.methods.imagic` runs with its defaults (stage A 100 steps at 1e-3, stage B 200
steps at 1e-4, batch 4, classifier-free guidance 3, 20 steps of unipc_auto); SDEdit (`methods.sdedit`,
ancestral, 20 steps) runs from the input with the same text and guidance.

    python papers/imagic/run.py            # ~25 CPU-minutes (one thread)
    python papers/imagic/run.py --quick    # plumbing check, written to _quick/
    python papers/imagic/run.py --report   # rebuild report.md from results.json

Scores (the shapes attribute classifier, test accuracy 1.0 on every head, and the renderer): success =
the edited attribute reads as the target; kept = the other four attributes (size, position, background,
the unedited one of shape and colour) read as the input's; right = both; ideal MSE = the pixel error
against the ideal edit, the renderer's image of the target attributes with the input's size, position
and background. Each input gets n_seeds generations per setting (the same noise for every eta); the
standard errors are over inputs (the spread of per-input means).

Parts:
  sweep    n_images inputs (seed): Imagic at eta 0, 0.1, ..., 1 and SDEdit at t0 0.2, 0.3, ..., 1;
           the trade-off curves, and each method's best setting by the right rate.
  confirm  n_images fresh inputs (seed + 1): Imagic at the sweep's best eta against SDEdit at the
           sweep's best t0, paired per input.

Verdict rules, fixed before the first run: (1) the trade-off holds if success at eta 1 exceeds success
at eta 0 by 2 SE and kept at eta 0 exceeds kept at eta 1 by 2 SE; (2) "a middle eta achieves both" holds
if the best eta by the right rate lies strictly inside (0, 1) and its right rate exceeds both ends' by
2 SE; (3) Imagic beats SDEdit if, on the confirm inputs, the mean paired difference of the per-input
right rates exceeds 2 SE of those differences.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/imagic/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
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
from difflab.data.shapes import ATTRIBUTES, COLORS, SHAPES, render  # noqa: E402
from difflab.methods.imagic import imagic_fit  # noqa: E402
from difflab.methods.sdedit import sdedit  # noqa: E402
from difflab.metrics.classifiers import load_classifier, prepare_images  # noqa: E402
from difflab.core.sampling import edit_sigmas  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
BASE = "shapes-text-unet"
HEADS = ("shape", "color", "size", "position", "background")
FULL = {
    "n_images": 8,
    "n_seeds": 4,
    "steps": 20,
    "guidance": 3.0,
    "embed_steps": 100,
    "embed_lr": 1e-3,
    "tune_steps": 200,
    "tune_lr": 1e-4,
    "batch": 4,
    "etas": [round(0.1 * i, 1) for i in range(11)],
    "t0s": [round(0.1 * i, 1) for i in range(2, 11)],
}
QUICK = {
    **FULL,
    "n_images": 2,
    "n_seeds": 2,
    "steps": 4,
    "embed_steps": 2,
    "tune_steps": 2,
    "etas": [0.0, 0.5, 1.0],
    "t0s": [0.5, 1.0],
}


# --------------------------------------------------------------------------------------------
# Inputs, edits and scores
# --------------------------------------------------------------------------------------------


def _excluded(pipe) -> set[tuple[str, str]]:
    rules = pipe.config.get("train", {}).get("data_kwargs", {}).get("exclude", [])
    return {(r["shape"], r["color"]) for r in rules if set(r) == {"shape", "color"}}


def make_cases(pipe, n: int, seed: int) -> list[dict]:
    """n (input attributes, target attributes, target text); colour edits at even i, shape edits at odd."""
    held_out = _excluded(pipe)
    g = torch.Generator().manual_seed(seed)
    pick = lambda vocab: vocab[int(torch.randint(len(vocab), (1,), generator=g))]  # noqa: E731
    cases = []
    while len(cases) < n:
        src = {k: pick(v) for k, v in ATTRIBUTES.items()}
        if (src["shape"], src["color"]) in held_out:
            continue
        edit = "color" if len(cases) % 2 == 0 else "shape"
        choices = [v for v in (COLORS if edit == "color" else SHAPES) if v != src[edit]]
        tgt = dict(src, **{edit: pick(choices)})
        if (tgt["shape"], tgt["color"]) in held_out:
            continue
        cases.append({"src": src, "tgt": tgt, "edit": edit, "text": f"a {tgt['color']} {tgt['shape']}"})
    return cases


class Scorer:
    def __init__(self):
        self.clf = load_classifier("shapes")

    def __call__(self, x: torch.Tensor, case: dict) -> dict:
        """Per-sample success, kept, right (0/1) and ideal MSE of outputs x (n, 3, 32, 32)."""
        with torch.no_grad():
            logits = self.clf(prepare_images(x.float().clamp(-1, 1), 3, 32))
        pred = {h: logits[h].argmax(1) for h in HEADS}
        idx = {h: ATTRIBUTES[h].index(case["tgt"][h]) for h in HEADS}
        edit = case["edit"]
        success = (pred[edit] == idx[edit]).float()
        kept = torch.stack([(pred[h] == idx[h]).float() for h in HEADS if h != edit]).prod(0)
        ideal = render(case["tgt"])[None]
        mse = (x.float().clamp(-1, 1) - ideal).pow(2).flatten(1).mean(1)
        return {"success": success, "kept": kept, "right": success * kept, "mse": mse}


def _summary(per_input: list[dict]) -> dict:
    """Means over inputs of the per-input means, with the SE over inputs."""
    out = {}
    for m in ("success", "kept", "right", "mse"):
        v = torch.tensor([float(d[m].mean()) for d in per_input])
        out[m] = round(float(v.mean()), 4)
        out[m + "_se"] = round(float(v.std() / len(v) ** 0.5) if len(v) > 1 else 0.0, 4)
        out[m + "_per_input"] = [round(float(a), 4) for a in v]
    return out


# --------------------------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------------------------


def _imagic(run: Run, pipe, case: dict, etas: list[float], i: int) -> tuple[dict, float]:
    """Imagic outputs {eta: (n_seeds, 3, H, W)} for one case, and the CPU-seconds of its fit."""
    st = run.settings
    x = render(case["src"])[None]
    c0 = cpu_seconds()
    fit = imagic_fit(
        pipe.denoiser,
        x,
        pipe.cond(case["text"]),
        embed_steps=st["embed_steps"],
        embed_lr=st["embed_lr"],
        tune_steps=st["tune_steps"],
        tune_lr=st["tune_lr"],
        batch=st["batch"],
        generator=torch.Generator().manual_seed(run.seed * 1000 + i),
    )
    fit_s = cpu_seconds() - c0
    sig = pipe.sigmas_for(st["steps"])
    uncond = pipe.cond("")
    out = {}
    with torch.no_grad():
        for eta in etas:
            xs = []
            for s in range(st["n_seeds"]):
                x_T = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(10_000 + s)) * float(sig[0])
                xs.append(fit.generate(eta, sig, guidance_scale=st["guidance"], uncond=uncond, x_T=x_T))
            out[eta] = torch.cat(xs)
    return out, fit_s


def _sdedit(run: Run, pipe, case: dict, t0s: list[float]) -> dict:
    st = run.settings
    x = render(case["src"])[None]
    D = cfg(st["guidance"], pipe.cond(""))(pipe.denoiser)
    cond = pipe.cond(case["text"])
    out = {}
    with torch.no_grad():
        for t0 in t0s:
            tail = edit_sigmas(pipe.denoiser.schedule, t0, st["steps"])
            xs = [
                sdedit(D, x, tail, strength=1.0, cond=cond, noise=torch.Generator().manual_seed(10_000 + s))
                for s in range(st["n_seeds"])
            ]
            out[t0] = torch.cat(xs)
    return out


def _evaluate(run: Run, cases: list[dict], etas: list[float], t0s: list[float], tag: str) -> dict:
    pipe = load_pipeline(BASE)
    score = Scorer()
    im_scores = {eta: [] for eta in etas}
    sd_scores = {t0: [] for t0 in t0s}
    fit_seconds, strips = [], {}
    for i, case in enumerate(cases):
        t = time.perf_counter()
        im, fit_s = _imagic(run, pipe, case, etas, i)
        sd = _sdedit(run, pipe, case, t0s)
        fit_seconds.append(fit_s)
        for eta in etas:
            im_scores[eta].append(score(im[eta], case))
        for t0 in t0s:
            sd_scores[t0].append(score(sd[t0], case))
        strips[i] = {"imagic": {key(e): v[0] for e, v in im.items()}, "sdedit": {key(t): v[0] for t, v in sd.items()}}
        log(f"{tag} {i + 1}/{len(cases)} '{case['text']}' ({case['edit']} edit) in {time.perf_counter() - t:.0f} s")
    torch.save(strips, run.cache(f"{tag}_strips.pt"))
    return {
        "cases": cases,
        "imagic": {key(e): _summary(v) for e, v in im_scores.items()},
        "sdedit": {key(t): _summary(v) for t, v in sd_scores.items()},
        "fit_cpu_s": round(sum(fit_seconds) / len(fit_seconds), 1),
        "settings": run.settings,
    }


def _best(rows: dict) -> str:
    """The setting with the highest right rate (ties: the lower ideal MSE)."""
    return max(rows, key=lambda k: (rows[k]["right"], -rows[k]["mse"]))


def part_sweep(run: Run) -> dict:
    pipe = load_pipeline(BASE)
    cases = make_cases(pipe, run.settings["n_images"], run.seed)
    res = _evaluate(run, cases, run.settings["etas"], run.settings["t0s"], "sweep")
    res["best_eta"], res["best_t0"] = _best(res["imagic"]), _best(res["sdedit"])
    return res


def part_confirm(run: Run) -> dict:
    sweep = run.results.load().get("sweep")
    if sweep is None:
        raise ValueError("part confirm needs the sweep's best settings: run --only sweep first")
    pipe = load_pipeline(BASE)
    cases = make_cases(pipe, run.settings["n_images"], run.seed + 1)
    eta, t0 = float(sweep["best_eta"]), float(sweep["best_t0"])
    res = _evaluate(run, cases, [eta], [t0], "confirm")
    a = res["imagic"][key(eta)]["right_per_input"]
    b = res["sdedit"][key(t0)]["right_per_input"]
    d = torch.tensor(a) - torch.tensor(b)
    res["eta"], res["t0"] = key(eta), key(t0)
    res["diff"] = round(float(d.mean()), 4)
    res["diff_se"] = round(float(d.std() / len(d) ** 0.5), 4)
    return res


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _row(r: dict) -> str:
    return (
        f"{pm(r['success'], r['success_se'], 2)} | {pm(r['kept'], r['kept_se'], 2)} | "
        f"{pm(r['right'], r['right_se'], 2)} | {pm(r['mse'], r['mse_se'], 3)}"
    )


def _gt(a: dict, b: dict, m: str) -> bool:
    return a[m] - b[m] > 2 * (a[m + "_se"] ** 2 + b[m + "_se"] ** 2) ** 0.5


def _figures(sweep: dict) -> list[str]:
    lines = []
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, rows, lab in (("imagic", sweep["imagic"], "eta"), ("sdedit", sweep["sdedit"], "t0")):
        xs = [rows[k]["success"] for k in rows]
        ys = [rows[k]["kept"] for k in rows]
        ax.plot(xs, ys, "o-", label=f"{'Imagic over eta' if name == 'imagic' else 'SDEdit over t0'}")
        for k in rows:
            ax.annotate(f"{lab} {k}", (rows[k]["success"], rows[k]["kept"]), fontsize=6)
    ax.set_xlabel("edit success (target attribute)")
    ax.set_ylabel("kept (the other four attributes)")
    ax.legend(fontsize=7)
    ax.set_title("the trade-off curves (sweep inputs)", fontsize=9)
    save_figure(fig, OUT / "figures" / "tradeoff.png", dpi=110)
    lines.append("![success against kept, Imagic over eta and SDEdit over t0](figures/tradeoff.png)\n")
    strip_file = OUT / "cache" / "sweep_strips.pt"
    if strip_file.exists():
        strips = torch.load(strip_file, weights_only=True)
        cases = sweep["cases"]
        shown = [k for k in ("0", "0.4", "0.6", "0.7", "0.8", "1") if k in sweep["imagic"]]
        rows = {"input": torch.stack([render(c["src"]) for c in cases])}
        for k in shown:
            rows[f"Imagic eta {k}"] = torch.stack([strips[i]["imagic"][k] for i in range(len(cases))])
        t0 = sweep["best_t0"]
        rows[f"SDEdit t0 {t0}"] = torch.stack([strips[i]["sdedit"][t0] for i in range(len(cases))])
        rows["ideal edit"] = torch.stack([render(c["tgt"]) for c in cases])
        image_rows(rows, OUT / "figures" / "edits.png", "; ".join(c["text"] for c in cases[:4]) + " ...")
        lines.append(
            "![the sweep's inputs, Imagic over eta, SDEdit at its best t0, the ideal edit](figures/edits.png)\n"
        )
    return lines


def _claims(sweep: dict | None, conf: dict | None) -> list[str]:
    L = []
    if sweep:
        im = sweep["imagic"]
        first, last = im[min(im, key=float)], im[max(im, key=float)]
        trade = _gt(last, first, "success") and _gt(first, last, "kept")
        L.append(
            f"- **Eta trades edit success against fidelity to the input.** Success {pm(first['success'], first['success_se'], 2)} "
            f"at eta 0 against {pm(last['success'], last['success_se'], 2)} at eta 1; kept {pm(first['kept'], first['kept_se'], 2)} "
            f"against {pm(last['kept'], last['kept_se'], 2)}: **{'holds' if trade else 'does not hold'}** (rule 1)."
        )
        b = sweep["best_eta"]
        mid = 0 < float(b) < 1 and _gt(im[b], first, "right") and _gt(im[b], last, "right")
        L.append(
            f"- **A middle eta achieves both.** The best eta by the right rate is {b} (right "
            f"{pm(im[b]['right'], im[b]['right_se'], 2)}; eta 0 {pm(first['right'], first['right_se'], 2)}, eta 1 "
            f"{pm(last['right'], last['right_se'], 2)}): **{'holds' if mid else 'does not hold'}** (rule 2, read off the "
            "sweep)."
        )
    if conf:
        a, b = conf["imagic"][conf["eta"]], conf["sdedit"][conf["t0"]]
        beats = conf["diff"] > 2 * conf["diff_se"]
        L.append(
            f"- **Imagic edits better than SDEdit with the same text.** On {len(conf['cases'])} fresh inputs, each at "
            f"its sweep-chosen setting (Imagic eta {conf['eta']}, SDEdit t0 {conf['t0']}): right rate "
            f"{pm(a['right'], a['right_se'], 2)} against {pm(b['right'], b['right_se'], 2)}, paired difference "
            f"{pm(conf['diff'], conf['diff_se'], 2)}: **{'holds' if beats else 'does not hold'}** (rule 3)."
        )
    return L


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    L = report_head("Imagic (Kawar et al. 2023)", "imagic", __doc__)
    sweep, conf = res.get("sweep"), res.get("confirm")
    L += ["## Claims, measured\n", *_claims(sweep, conf), ""]
    if sweep:
        st = sweep["settings"]
        L.append(
            f"## 1. Sweep ({st['n_images']} inputs x {st['n_seeds']} generations; Imagic's stages A+B take "
            f"{sweep['fit_cpu_s']:.0f} CPU-s per input)\n"
        )
        L += ["| setting | success | kept | right | ideal MSE |", "|---|---|---|---|---|"]
        L += [f"| Imagic eta {k} | {_row(r)} |" for k, r in sweep["imagic"].items()]
        L += [f"| SDEdit t0 {k} | {_row(r)} |" for k, r in sweep["sdedit"].items()]
        L.append("")
        L.append(f"Best settings by the right rate: Imagic eta {sweep['best_eta']}, SDEdit t0 {sweep['best_t0']}.\n")
        L += _figures(sweep)
    if conf:
        a, b = conf["imagic"][conf["eta"]], conf["sdedit"][conf["t0"]]
        L.append(f"## 2. Confirmation on {len(conf['cases'])} fresh inputs (seed + 1)\n")
        L += ["| method | success | kept | right | ideal MSE |", "|---|---|---|---|---|"]
        L.append(f"| Imagic eta {conf['eta']} | {_row(a)} |")
        L.append(f"| SDEdit t0 {conf['t0']} | {_row(b)} |")
        L.append("")
    L.append(
        "## Notes\n\nStage B decides it. At this page's 200 steps (lr 1e-4) the eta-0 output does not reproduce the "
        "input (kept 0.62 at eta 0: backgrounds flip, shapes soften), so no eta is both faithful and edited. A pilot "
        "after this run, on 3 other inputs (seed 100), with 600 steps at lr 2e-4: every eta gave the same image, "
        "the input's (the model no longer reads the embedding); with 400 steps at lr 1e-4, two of the three gave one "
        "image for every eta and the third edited only at eta 1, losing the rest there (success 0.75, kept 0.00). "
        "The paper tunes Imagen's stage B for 1500 steps at 5e-7; a sweep of stage B judged by the eta-0 "
        "reconstruction on more inputs is the run to try next.\n"
    )
    meta = timing(res, ("sweep", "confirm"))
    if meta:
        L.append(f"Time: {meta['cpu_min']:.1f} CPU-minutes ({res.get('runs', {}).get('machine', '')}).\n")
    atomic_write_text(OUT / "report.md", "\n".join(L) + "\n")


def configure(run: Run) -> None:
    global OUT
    OUT = run.out


PAPER = Paper(
    "imagic",
    __doc__,
    title="Imagic (Kawar et al. 2023)",
    claim="An embedding optimised to reconstruct one image and a model fine-tuned on it edit that image by "
    "interpolating toward the target text: eta trades edit success against fidelity, a middle eta achieves both.",
    parts={"sweep": part_sweep, "confirm": part_confirm},
    report=write_report,
    full=FULL,
    quick=QUICK,
    configure=configure,
)


if __name__ == "__main__":
    main(PAPER)
