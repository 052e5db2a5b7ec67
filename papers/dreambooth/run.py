"""DreamBooth (Ruiz et al. 2023, arXiv 2208.12242): a subject bound to a rare identifier by fine-tuning
the whole denoiser or LoRA adapters, with and without class-specific prior preservation.

The base is the zoo's shapes-text-unet (MiniLM text encoder, 32 x 32 pixels) and the subject is the
red star that Textual Inversion learns on its page (papers/textual_inversion): its training captions
never paired "red" with "star", so "a star" gives stars of the other colours. A few red stars from
the shapes generator are the user's images, captioned "a sks star"; the prior images are the frozen
base's own samples of "a star" (the class prompt), trained on beside them with weight lambda.

    python papers/dreambooth/run.py            # ~50 CPU-minutes (one thread)
    python papers/dreambooth/run.py --quick    # plumbing check, written to _quick/
    python papers/dreambooth/run.py --report   # rebuild report.md from results.json

Parts:
  learn  `difflab finetune dreambooth --base shapes-text-unet --identifier sks --class-noun star` on
         n_images red stars, four ways: every weight or LoRA (rank lora_rank), each with prior weight
         lambda = 1 (class_images prior images) and 0; `steps` steps each, the same seed.
  eval   n samples of "a sks star" (the subject prompt) and of "a star" (the class prompt) from the
         base and from each fine-tuned model, the same seeds everywhere, scored by papers/concepts.py's
         judge: the red-star rate (shapes attribute classifier), SIM (the classifier's features in
         place of the paper's DINO: the subject fidelity, and for class-prompt samples the paper's
         PRES, drift toward the subject), CLIP-I (the shipped image-text model's image tower), DIV
         (mean pairwise feature distance; the paper uses LPIPS) and the colour diversity (the chance
         that two samples differ in predicted colour).
  novel  an appearance the base never drew, the two-colour star: full and LoRA with the prior on
         the same settings, judged by the rate of samples showing it (two_colour_score).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a file: python papers/dreambooth/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from papers.runner import (  # noqa: E402
    exceeds,
    image_rows,
    pm,
    report_head,
    Paper,
    Results,
    Run,
    atomic_write_text,
    cpu_seconds,
    load_pipeline,
    log,
    main,
    prop_se,
)
from papers.concepts import Judge, concept_images  # noqa: E402

from difflab.data.shapes import COLORS  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE
BASE = "shapes-text-unet"
IDENTIFIER, CLASS = "sks", "star"
SUBJECT_PROMPT, CLASS_PROMPT = f"a {IDENTIFIER} {CLASS}", f"a {CLASS}"
FULL = {
    "n_images": 5,
    "steps": 300,
    "lr_full": 2e-4,
    "lr_lora": 1e-3,
    "lora_rank": 4,
    "class_images": 100,
    "class_steps": 20,
    "batch_size": 8,
    "n": 200,
    "n_ref": 100,
    "sample_steps": 20,
    "guidance": 3.0,
    "boot": 200,
}
QUICK = {
    "n_images": 3,
    "steps": 4,
    "lr_full": 2e-4,
    "lr_lora": 1e-3,
    "lora_rank": 2,
    "class_images": 8,
    "class_steps": 4,
    "batch_size": 4,
    "n": 12,
    "n_ref": 8,
    "sample_steps": 4,
    "guidance": 3.0,
    "boot": 20,
}
# name -> (LoRA?, prior weight lambda)
VARIANTS = {"full": (False, 1.0), "full_noprior": (False, 0.0), "lora": (True, 1.0), "lora_noprior": (True, 0.0)}
LABEL = {
    "base": "base (no fine-tuning)",
    "full": "full, prior 1",
    "full_noprior": "full, no prior",
    "lora": "LoRA, prior 1",
    "lora_noprior": "LoRA, no prior",
}


def _base() -> Path:
    from difflab.assets import resolve_run

    return resolve_run(BASE)


def _weights_bytes(folder: Path) -> int:
    """Bytes of the weights a run ships: its model.safetensors (the adapter's, for a LoRA run); the
    training state beside it (checkpoint.safetensors, for resuming) is not part of the concept."""
    return (folder / "model.safetensors").stat().st_size


def _finetune(run: Run, images: torch.Tensor, folder: Path, lora: bool, prior: float) -> dict:
    """One DreamBooth run into `folder`; its CPU-minutes, wall seconds and weight bytes."""
    from difflab.finetune import dreambooth

    st = run.settings
    c0, t0 = cpu_seconds(), time.perf_counter()
    dreambooth(
        _base(),
        images,
        folder,
        identifier=IDENTIFIER,
        class_noun=CLASS,
        prior_weight=prior,
        class_images=st["class_images"],
        class_steps=st["class_steps"],
        lora=lora,
        lora_rank=st["lora_rank"],
        steps=st["steps"],
        lr=st["lr_lora"] if lora else st["lr_full"],
        batch_size=st["batch_size"],
        seed=run.seed,
        progress=False,
    )
    return {
        "cpu_min": round((cpu_seconds() - c0) / 60, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
        "file_bytes": _weights_bytes(folder),
    }


def part_learn(run: Run) -> dict:
    st = run.settings
    images = concept_images(st["n_images"], run.seed)
    out = {}
    for name, (lora, prior) in VARIANTS.items():
        out[name] = _finetune(run, images, run.out / "cache" / name, lora, prior)
        log(f"{name}: {out[name]}")
    return {
        "variants": out,
        "base_bytes": _weights_bytes(_base()),
        "settings": {k: st[k] for k in ("n_images", "steps", "lr_full", "lr_lora", "lora_rank", "class_images")},
    }


def part_novel(run: Run) -> dict:
    """The two-colour star (papers/concepts.py), an appearance the base never drew: full and LoRA with
    the prior, the same settings as the red star; "a sks star" judged against its held-out images."""
    st = run.settings
    images = concept_images(st["n_images"], run.seed, "two_colour")
    judge = Judge(concept_images(st["n_ref"], run.seed + 7, "two_colour"))
    cost, rows, grids = {}, {}, {}
    for name in ("base", "full", "lora"):
        folder = _base()
        if name != "base":
            folder = run.out / "cache" / f"novel_{name}"
            cost[name] = _finetune(run, images, folder, lora=name == "lora", prior=1.0)
        x = load_pipeline(folder)(
            st["n"], prompt=SUBJECT_PROMPT, steps=st["sample_steps"], guidance_scale=st["guidance"], seed=run.seed
        )
        rows[name] = judge(x, st["boot"], run.seed)
        grids[name] = x[:8]
        log(f"novel {name}: split {rows[name]['split']:.3f} CLIP-I {rows[name]['clip_sim']:.3f}")
    torch.save({"images": images, **grids}, run.out / "cache" / "novel_grids.pt")
    return {"rows": rows, "cost": cost}


def part_eval(run: Run) -> dict:
    st = run.settings
    judge = Judge(concept_images(st["n_ref"], run.seed + 7))  # held-out: other seeds than the training images
    rows, grids = {}, {}
    for name in ["base", *VARIANTS]:
        pipe = load_pipeline(_base() if name == "base" else run.out / "cache" / name)
        rows[name] = {}
        for i, prompt in enumerate((SUBJECT_PROMPT, CLASS_PROMPT)):
            x = pipe(st["n"], prompt=prompt, steps=st["sample_steps"], guidance_scale=st["guidance"], seed=run.seed + i)
            rows[name][prompt] = judge(x, st["boot"], run.seed)
            grids[f"{name}|{prompt}"] = x[:8]
            log(f"{name} {prompt!r}: subject {rows[name][prompt]['subject']:.3f} sim {rows[name][prompt]['sim']:.3f}")
    torch.save(grids, run.out / "cache" / "grids.pt")
    return {"rows": rows, "settings": {k: st[k] for k in ("n", "n_ref", "sample_steps", "guidance", "boot")}}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _rate(r: dict, k: str) -> str:
    return pm(r[k], prop_se(r[k], r["n"]))


def write_report(run: Run) -> None:
    res = Results(OUT).load()
    L = report_head(
        "DreamBooth: a subject bound to an identifier, with and without prior preservation (Ruiz et al. 2023)",
        "dreambooth",
        __doc__,
    )
    learn, ev = res.get("learn"), res.get("eval")
    if ev:
        rows, st = ev["rows"], ev["settings"]
        L.append(
            f"n = {st['n']} samples per prompt and model, {st['sample_steps']} steps, guidance {st['guidance']}; "
            f"{st['n_ref']} held-out subject images; standard errors are binomial for rates, over samples for "
            f"SIM, and from {st['boot']} bootstrap resamples for the diversities.\n"
        )
    if ev or learn or res.get("novel"):
        L.append("## Claims, measured\n")
    if ev:
        L.append(_fidelity_claim(rows))
        L.append(_prior_claim(rows))
    if res.get("novel"):
        L.append(_novel_claim(res["novel"]))
    if learn:
        L.append(_cost_claim(learn, res.get("novel")))
    if ev:
        L += [
            "## Every model and prompt\n",
            f"| model | prompt | red star | star | red | SIM | CLIP-I | DIV | colour diversity | colours ({', '.join(COLORS)}) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, by_prompt in rows.items():
            for prompt, r in by_prompt.items():
                L.append(
                    f"| {LABEL[name]} | {prompt} | {_rate(r, 'subject')} | {_rate(r, 'star')} | {_rate(r, 'red')} | "
                    f"{pm(r['sim'], r['sim_se'])} | {pm(r['clip_sim'], r['clip_sim_se'])} | {pm(r['div'], r['div_se'])} | "
                    f"{pm(r['color_div'], r['color_div_se'])} | {r['colors']} |"
                )
        L.append(_figure())
    novel_grids = OUT / "cache" / "novel_grids.pt"
    if res.get("novel") and novel_grids.exists():
        g = torch.load(novel_grids, weights_only=True)
        rows = {"the user's images": g["images"], **{LABEL[k]: g[k] for k in ("base", "full", "lora")}}
        image_rows(
            rows, OUT / "figures" / "two_colour.png", f"'{SUBJECT_PROMPT}' after DreamBooth on the two-colour star"
        )
        L.append("\n![the two-colour star: the user's images and samples](figures/two_colour.png)\n")
    atomic_write_text(OUT / "report.md", "\n".join(L))


def _fidelity_claim(rows: dict) -> str:
    base = rows["base"][SUBJECT_PROMPT]
    parts, verdicts = [], []
    for name in ("full", "lora"):
        r = rows[name][SUBJECT_PROMPT]
        ok = exceeds(r["subject"], prop_se(r["subject"], r["n"]), base["subject"], prop_se(base["subject"], base["n"]))
        ok &= exceeds(r["sim"], r["sim_se"], base["sim"], base["sim_se"])
        ok &= exceeds(r["clip_sim"], r["clip_sim_se"], base["clip_sim"], base["clip_sim_se"])
        verdicts.append(ok)
        parts.append(
            f"{LABEL[name]}: red-star rate {_rate(r, 'subject')}, SIM {pm(r['sim'], r['sim_se'])}, "
            f"CLIP-I {pm(r['clip_sim'], r['clip_sim_se'])}"
        )
    ti = _ti_rate()
    return (
        f"- **Fine-tuning binds the subject to '{SUBJECT_PROMPT}', for every weight and for LoRA.** "
        + "; ".join(parts)
        + f"; the base on the same prompt: {_rate(base, 'subject')}, SIM {pm(base['sim'], base['sim_se'])}, "
        f"CLIP-I {pm(base['clip_sim'], base['clip_sim_se'])}. "
        + _verdict(verdicts)
        + " (the rate, SIM and CLIP-I each above the base's by 2 standard errors decide)."
        + (
            f" Textual Inversion's learned word reached {ti} on the same concept and classifier (its page)."
            if ti
            else ""
        )
        + "\n"
    )


def _verdict(verdicts: list[bool]) -> str:
    if all(verdicts):
        return "Holds for both"
    if any(verdicts):
        return "Holds partly: for " + (LABEL["full"] if verdicts[0] else LABEL["lora"]) + " only"
    return "Does not hold"


def _ti_rate() -> str | None:
    r = _ti_results().get("eval", {}).get("rows", {}).get("a <S*>")
    if not r:
        return None
    return f"{_rate({'subject': r['concept'], 'n': r['n']}, 'subject')} (n = {r['n']})"


def _prior_claim(rows: dict) -> str:
    lines = []
    for kind in ("full", "lora"):
        w, wo = rows[kind][CLASS_PROMPT], rows[f"{kind}_noprior"][CLASS_PROMPT]
        drift = exceeds(wo["subject"], prop_se(wo["subject"], wo["n"]), w["subject"], prop_se(w["subject"], w["n"]))
        drift_sim = exceeds(wo["sim"], wo["sim_se"], w["sim"], w["sim_se"])
        loses = exceeds(w["color_div"], w["color_div_se"], wo["color_div"], wo["color_div_se"])
        loses_div = exceeds(w["div"], w["div_se"], wo["div"], wo["div_se"])
        verdict = "holds" if drift and loses else "partly holds" if drift or loses else "does not hold"
        lines.append(
            f"  - {kind}: red-star rate of '{CLASS_PROMPT}' {_rate(wo, 'subject')} without the prior against "
            f"{_rate(w, 'subject')} with it (drift {'shown' if drift else 'not shown'}; SIM "
            f"{pm(wo['sim'], wo['sim_se'])} against {pm(w['sim'], w['sim_se'])}, "
            f"{'higher' if drift_sim else 'not higher'} at 2 SE); colour diversity {pm(wo['color_div'], wo['color_div_se'])} "
            f"without against {pm(w['color_div'], w['color_div_se'])} with ({'lost' if loses else 'not lost'}; DIV "
            f"{pm(wo['div'], wo['div_se'])} against {pm(w['div'], w['div_se'])}, {'lower' if loses_div else 'not lower'}"
            f" at 2 SE): **{verdict}**."
        )
    b = rows["base"][CLASS_PROMPT]
    return (
        f"- **Without prior preservation the class prompt drifts toward the subject and loses diversity (the "
        f"paper's language drift).** The base's '{CLASS_PROMPT}': red-star rate {_rate(b, 'subject')}, colour "
        f"diversity {pm(b['color_div'], b['color_div_se'])}, DIV {pm(b['div'], b['div_se'])}. Drift is decided by "
        "the red-star rate, lost diversity by the colour diversity (2 standard errors each); SIM and DIV are "
        "reported beside them.\n" + "\n".join(lines) + "\n"
    )


def _ti_results() -> dict:
    import json

    try:
        return json.loads((HERE.parent / "textual_inversion" / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _novel_claim(novel: dict) -> str:
    rows, base = novel["rows"], novel["rows"]["base"]
    ti = _ti_results().get("novel", {}).get("rows", {}).get("a <T*>")
    parts, verdicts = [], []
    for name in ("full", "lora"):
        r = rows[name]
        ok = exceeds(r["split"], prop_se(r["split"], r["n"]), base["split"], prop_se(base["split"], base["n"]))
        if ti:
            ok &= exceeds(r["split"], prop_se(r["split"], r["n"]), ti["split"], prop_se(ti["split"], ti["n"]))
        verdicts.append(ok)
        parts.append(
            f"{LABEL[name]}: {_rate(r, 'split')} (both colours in the object {_rate(r, 'two_colours')}), "
            f"CLIP-I {pm(r['clip_sim'], r['clip_sim_se'])}"
        )
    against = (
        f"; Textual Inversion's learned word on the same concept (its page): {_rate(ti, 'split')}, CLIP-I "
        f"{pm(ti['clip_sim'], ti['clip_sim_se'])}"
        if ti
        else " (Textual Inversion's page has no two-colour run yet: compared with the base only)"
    )
    return (
        "- **On an appearance the base never drew (a star red on the left, blue on the right), fine-tuning the "
        "denoiser learns what a new word cannot.** Rate of samples of "
        f"'{SUBJECT_PROMPT}' that show it (two_colour_score): "
        + "; ".join(parts)
        + f"; the base: {_rate(base, 'split')}"
        + against
        + ". "
        + _verdict(verdicts)
        + " (each fine-tuned rate above the base's and the learned word's by 2 standard errors decides). The score "
        "gives each pixel its nearest palette colour, so a half drawn in a lighter blue counts as cyan and the "
        "sample as not showing the concept: judge the figure below beside it.\n"
    )


def _cost_claim(learn: dict, novel: dict | None = None) -> str:
    st, v = learn["settings"], learn["variants"]
    L = [
        f"- **Cost per concept** ({st['n_images']} images, {st['steps']} steps, batch 8; prior runs include sampling "
        f"{st['class_images']} class images; the base's weights are {learn['base_bytes']:,} bytes):\n",
        "| method | CPU-minutes | file bytes |",
        "|---|---|---|",
    ]
    ti = _ti_results()
    for key, what in (("learn", "red star"), ("novel", "two-colour star")):
        t = ti.get(key, {}).get("cost", ti.get(key)) if key == "novel" else ti.get(key)
        if t and "cpu_min" in t:
            L.append(f"| Textual Inversion, {what} (its page) | {t['cpu_min']} | {t['file_bytes']:,} |")
    for name, r in v.items():
        L.append(f"| DreamBooth {LABEL[name]}, red star | {r['cpu_min']} | {r['file_bytes']:,} |")
    for name, r in (novel or {}).get("cost", {}).items():
        L.append(f"| DreamBooth {LABEL[name]}, two-colour star | {r['cpu_min']} | {r['file_bytes']:,} |")
    return "\n".join(L) + "\n"


def _figure() -> str:
    grid_file = OUT / "cache" / "grids.pt"
    if grid_file.exists():
        grids = torch.load(grid_file, weights_only=True)
        rows = {}
        for name in ["base", *VARIANTS]:
            for prompt in (SUBJECT_PROMPT, CLASS_PROMPT):
                rows[f"{LABEL[name]}: '{prompt}'"] = grids[f"{name}|{prompt}"]
        image_rows(rows, OUT / "figures" / "samples.png", "the subject and the class prompt per model", label_width=0.3)
    if not (OUT / "figures" / "samples.png").exists():
        return ""
    return "\n![samples of the subject and the class prompt per model](figures/samples.png)\n"


def configure(run: Run) -> None:
    global OUT
    OUT = run.out


PAPER = Paper(
    "dreambooth",
    __doc__,
    title="DreamBooth (Ruiz et al. 2023)",
    claim="Fine-tuning on a few images binds a subject to a rare identifier; class-specific prior preservation keeps the plain class prompt from drifting toward the subject and losing diversity.",
    parts={"learn": part_learn, "eval": part_eval, "novel": part_novel},
    report=write_report,
    full=FULL,
    quick=QUICK,
    configure=configure,
)


if __name__ == "__main__":
    main(PAPER)
