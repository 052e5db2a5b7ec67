"""Asyrp (Kwon, Jeong, Uh 2023, arXiv 2210.10960): a shift of the frozen UNet's bottleneck (h-space),
learned once, edits unseen images; its strength grows with the shift's scale; only the asymmetric
reverse process edits.

The setting is papers/clip_domain.py's, but for the model's condition: the zoo's shapes-text-unet,
never changed, conditioned on "a circle" (the domain without its colour: conditioned on "a red circle"
every step pulled the colour back to red and no edit appeared; the empty prompt inverts the inputs
poorly), the shipped SmallCLIP, the direction "a red circle" -> "a green circle", n_train red circles
to learn f_t on, n_test unseen ones to edit. `difflab.methods.asyrp` runs on the 40-step DDIM grid
with no quality boosting (the outputs are compared with the plain reconstruction, which boosting would
perturb), 5 passes at lr 3e-2 with the editing interval [T, t_edit = 0.3]: a pilot (4 hand-picked
circles to learn on, 4 to edit, some of them among this page's) found no edit at lr 1e-3 or 3e-3, and
at 3e-2 two of four turned green with t_edit 0.3 against one with 0.5 (the official script trains f_t
at lr 0.5). The settings were fixed before this page's run.

    python papers/asyrp/run.py            # ~10 CPU-minutes (one thread)
    python papers/asyrp/run.py --quick    # plumbing check, written to _quick/
    python papers/asyrp/run.py --report   # rebuild report.md from results.json

Parts:
  edit  learn f_t on the training circles; edit each test circle (DDIM-inverted with the model) at
        scales 0 (the plain reconstruction), 0.25, 0.5, 0.75, 1, 1.5 and 2, and at scale 1 with the
        shift in both terms of the step (the paper's ablation). Scores as papers/imagic's (success,
        kept, right, ideal MSE), and the edit's size: the mean absolute pixel change from scale 0.

Verdict rules, fixed before the first run: (1) "one delta-h edits unseen images" holds if the success
at scale 1 exceeds the success at scale 0 by 2 SE (SE over test images); (2) "the edit grows roughly
linearly with the scale" holds if the pixel change rises with the scale over 0..1 and a line through
the origin fits it with R^2 >= 0.9; (3) "only the asymmetric process edits" holds if the success at
scale 1 with the asymmetric step exceeds the success with the shift in both terms by 2 SE.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/asyrp/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.clip_domain import BASE, SOURCE_TEXT, TARGET_TEXT, domain_cases, images_of  # noqa: E402
from papers.imagic.run import Scorer, _gt, _row, _summary  # noqa: E402
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

from difflab.assets import asset  # noqa: E402
from difflab.data.shapes import render  # noqa: E402
from difflab.edit import load_clip  # noqa: E402
from difflab.methods.asyrp import asyrp_invert, asyrp_sample, asyrp_train  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
MODEL_TEXT = "a circle"  # what the model is conditioned on: the domain without its colour (see the docstring)
FULL = {
    "n_train": 4,
    "n_test": 8,
    "steps": 40,
    "edit_t": 0.3,
    "iterations": 5,
    "lr": 3e-2,
    "clip_weight": 1.0,
    "recon_weight": 1.0,
    "scales": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
    "n_aug": 8,
}
QUICK = {**FULL, "n_train": 1, "n_test": 2, "steps": 4, "iterations": 1, "scales": [0.0, 0.5, 1.0], "n_aug": 2}


def part_edit(run: Run) -> dict:
    return _edit(run, "edit", 0)


def part_edit_aug(run: Run) -> dict:
    """The second attempt, chosen after the first's result: the directional loss over n_aug paired crops."""
    return _edit(run, "edit_aug", run.settings["n_aug"])


def _edit(run: Run, tag: str, n_aug: int) -> dict:
    st = run.settings
    pipe = load_pipeline(BASE)
    clip = load_clip(asset("clip", "shapes"))
    train = domain_cases(st["n_train"], run.seed)
    test = domain_cases(st["n_test"], run.seed + 1, exclude=train)
    cond = pipe.cond(MODEL_TEXT)
    t, c0 = time.perf_counter(), cpu_seconds()
    delta, losses = asyrp_train(
        pipe.denoiser,
        images_of(train),
        clip,
        SOURCE_TEXT,
        TARGET_TEXT,
        steps=st["steps"],
        edit_t=st["edit_t"],
        iterations=st["iterations"],
        lr=st["lr"],
        clip_weight=st["clip_weight"],
        recon_weight=st["recon_weight"],
        cond=cond,
        n_aug=n_aug,
        generator=torch.Generator().manual_seed(run.seed),
    )
    train_cpu = cpu_seconds() - c0
    log(
        f"f_t learned on {len(train)} circles in {time.perf_counter() - t:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )
    score = Scorer()
    x_test = images_of(test)
    kw = dict(steps=st["steps"], edit_t=st["edit_t"], cond=cond)
    outs = {key(s): [] for s in st["scales"]}
    outs["both"] = []
    for i in range(len(test)):
        x_T = asyrp_invert(pipe.denoiser, x_test[i : i + 1], steps=st["steps"], cond=cond)
        for s in st["scales"]:
            outs[key(s)].append(asyrp_sample(pipe.denoiser, x_T, delta, scale=s, **kw))
        outs["both"].append(asyrp_sample(pipe.denoiser, x_T, delta, scale=1.0, asymmetric=False, **kw))
    outs = {k: torch.cat(v).clamp(-1, 1) for k, v in outs.items()}
    torch.save(outs, run.cache(f"{tag}_outputs.pt"))
    base = outs[key(0.0)]
    rows = {}
    for k, x in outs.items():
        r = _summary([score(x[i : i + 1], c) for i, c in enumerate(test)])
        change = (x - base).abs().flatten(1).mean(1)
        r["change"] = round(float(change.mean()), 4)
        r["change_se"] = round(float(change.std() / len(change) ** 0.5), 4)
        rows[k] = r
    return {
        "train": train,
        "test": test,
        "n_aug": n_aug,
        "train_cpu_s": round(train_cpu, 1),
        "loss_start": losses[0],
        "loss_end": losses[-1],
        "rows": rows,
        "settings": st,
    }


def _linearity(rows: dict) -> tuple[bool, float]:
    pts = [(float(k), rows[k]["change"]) for k in rows if k != "both" and float(k) <= 1.0]
    xs = torch.tensor([p[0] for p in pts])
    ys = torch.tensor([p[1] for p in pts])
    slope = float((xs * ys).sum() / (xs * xs).sum())
    ss_res = float(((ys - slope * xs) ** 2).sum())
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 0.0
    order = [y for _, y in sorted(pts)]
    rising = all(b > a for a, b in zip(order, order[1:]))
    return rising and r2 >= 0.9, r2


def _caveat(one: dict, zero: dict) -> str:
    """The rules read the colour head alone; say so where the edited images are no longer the input's circles."""
    if one["success"] > zero["success"] and one["kept"] < 0.5 and one["mse"] > zero["mse"]:
        return (
            f" But kept is {one['kept']:.2f} and the MSE to the ideal edit rises ({zero['mse']:.3f} -> {one['mse']:.3f}): "
            "the outputs are no longer circles (figure), and the classifier's colour head reads blobs; the edit "
            "the claim means is not shown: it falls short in substance."
        )
    return ""


def _claims(ed: dict | None, what: str = "") -> list[str]:
    if not ed:
        return []
    rows = ed["rows"]
    zero, one, both = rows["0"], rows["1"], rows["both"]
    L = []
    ok1 = _gt(one, zero, "success")
    L.append(
        f"- **One delta-h, learned once with the model frozen, edits unseen images**{what}. On {len(ed['test'])} unseen red "
        f"circles: success {pm(one['success'], one['success_se'], 2)} at scale 1 against "
        f"{pm(zero['success'], zero['success_se'], 2)} at scale 0 (the plain reconstruction); kept "
        f"{pm(one['kept'], one['kept_se'], 2)}, right {pm(one['right'], one['right_se'], 2)}: "
        f"**{'holds' if ok1 else 'does not hold'}** (rule 1)." + _caveat(one, zero)
    )
    ok2, r2 = _linearity(rows)
    changes = ", ".join(f"{k}: {rows[k]['change']:.3f}" for k in rows if k != "both")
    L.append(
        f"- **The edit grows roughly linearly with the scale of delta-h**{what}. Mean pixel change from scale 0 by scale: "
        f"{changes}; a line through the origin over 0..1 fits with R^2 = {r2:.3f}: **{'holds' if ok2 else 'does not hold'}** "
        "(rule 2)."
    )
    ok3 = _gt(one, both, "success")
    L.append(
        f"- **Only the asymmetric process edits**{what}. Success at scale 1 {pm(one['success'], one['success_se'], 2)} with the "
        f"shift in the x0 prediction only, {pm(both['success'], both['success_se'], 2)} with it in both terms (pixel change "
        f"{one['change']:.3f} against {both['change']:.3f}): **{'holds' if ok3 else 'does not hold'}** (rule 3)."
        + _caveat(one, zero)
    )
    return L


def _figures(ed: dict, tag: str = "edit") -> list[str]:
    rows = ed["rows"]
    ks = [k for k in rows if k != "both"]
    fig, ax = plt.subplots(figsize=(4.4, 3.2))
    ax.errorbar(
        [float(k) for k in ks],
        [rows[k]["change"] for k in ks],
        [2 * rows[k]["change_se"] for k in ks],
        fmt="o-",
        label="pixel change",
    )
    ax.plot([float(k) for k in ks], [rows[k]["success"] for k in ks], "s--", label="success (green)")
    ax.set_xlabel("scale of delta-h")
    ax.legend(fontsize=7)
    name = "" if tag == "edit" else f"_{tag}"
    save_figure(fig, OUT / "figures" / f"scale{name}.png", dpi=110)
    lines = [f"![the edit against the scale of delta-h](figures/scale{name}.png)\n"]
    cache = OUT / "cache" / f"{tag}_outputs.pt"
    if cache.exists():
        outs = torch.load(cache, weights_only=True)
        shown = {"input": images_of(ed["test"])}
        shown.update({f"scale {k}": outs[k] for k in ks})
        shown["scale 1, both terms"] = outs["both"]
        shown["ideal edit"] = torch.stack([render(c["tgt"]) for c in ed["test"]])
        image_rows(shown, OUT / "figures" / f"edits{name}.png", f"unseen circles: '{SOURCE_TEXT}' -> '{TARGET_TEXT}'")
        lines.append(f"![unseen test circles over the scale, and the symmetric ablation](figures/edits{name}.png)\n")
    return lines


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    L = report_head("Asyrp (Kwon, Jeong, Uh 2023)", "asyrp", __doc__)
    attempts = [
        ("edit", " (as fixed before the run)"),
        ("edit_aug", " (the second attempt, after the first's result: the loss over paired crops)"),
    ]
    L.append("## Claims, measured\n")
    for tag, what in attempts:
        L += _claims(res.get(tag), what)
    L.append("")
    for n, (tag, _) in enumerate(attempts, start=1):
        ed = res.get(tag)
        if not ed:
            continue
        st = ed["settings"]
        aug = f", the loss over {ed['n_aug']} paired crops" if ed.get("n_aug") else ""
        L.append(
            f"## {n}. Edits of unseen images{aug} ({len(ed['train'])} training circles, f_t learned in "
            f"{ed['train_cpu_s']:.0f} CPU-s, loss {ed['loss_start']:.3f} -> {ed['loss_end']:.3f}; {len(ed['test'])} test "
            f"circles; {st['steps']} DDIM steps, t_edit {st['edit_t']}, {st['iterations']} passes at lr {st['lr']:g})\n"
        )
        L += ["| scale | success | kept | right | ideal MSE | pixel change |", "|---|---|---|---|---|---|"]
        for k, r in ed["rows"].items():
            name = "1, shift in both terms" if k == "both" else k
            L.append(f"| {name} | {_row(r)} | {pm(r['change'], r['change_se'], 3)} |")
        L.append("")
        L += _figures(ed, tag)
    L.append(
        "## Notes\n\nNeither attempt edits as the paper does. Without crops f_t barely moves the colour and already "
        "breaks shapes at scale 0.25; with the loss over paired crops the shift is strong (pixel change 0.5 at scale "
        "0.25, saturating near 0.95 from scale 1) and turns every circle into coloured blobs. The shift acts on a "
        "2.6 M-parameter UNet's 8 x 8 bottleneck and is judged by a 32 x 32 SmallCLIP: the h-space of so small a "
        "model may not carry the paper's disentangled directions. What to try next: a smaller lr with more passes "
        "(the loss rose over training in the second attempt, 1.03 -> 1.27), a larger lambda_recon, the later "
        "editing interval the paper picks by LPIPS, or a larger pretrained UNet.\n"
    )
    meta = timing(res, ("edit", "edit_aug"))
    if meta:
        L.append(f"Time: {meta['cpu_min']:.1f} CPU-minutes ({res.get('runs', {}).get('machine', '')}).\n")
    atomic_write_text(OUT / "report.md", "\n".join(L) + "\n")


def configure(run: Run) -> None:
    global OUT
    OUT = run.out


PAPER = Paper(
    "asyrp",
    __doc__,
    title="Asyrp (Kwon, Jeong, Uh 2023)",
    claim="A shift of the frozen UNet's bottleneck (h-space), learned once, edits unseen images through the "
    "asymmetric reverse process, its strength growing with the shift's scale.",
    parts={"edit": part_edit, "edit_aug": part_edit_aug},
    report=write_report,
    full=FULL,
    quick=QUICK,
    configure=configure,
)


if __name__ == "__main__":
    main(PAPER)
