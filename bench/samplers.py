"""Sampler accuracy against NFE on Gaussian mixtures, side by side with diffusers and k-diffusion.

For data whose exact denoiser is known (`GaussianMixture`), every deterministic sampler is an
approximation of one map: the probability-flow ODE from the same starting noise at the DDPM
linear schedule's sigma_max (~157) down to 0. The reference endpoint is that ODE solved by
scipy's DOP853 at rtol = atol = 1e-10. Per sample we measure the distance of a sampler's output
from it and whether the output lies in another mixture component (argmax responsibility at
sigma = 0) than the exact endpoint: a "mode flip". A few flips dominate an RMS, so the report
gives the median, the 90th percentile and the flip share.

Every configuration sees the same oracle and the same starting noise, in float64:
- ours: difflab's samplers on difflab's grids, the default recipe
  `sample(D, x, default_sigmas(schedule, n))` among them;
- k-diffusion: its samplers on its grids (get_sigmas_*) with the schedule's sigma range;
- diffusers: DDIM, DPM-Solver++(2M) and UniPC schedulers driven with an eps-prediction model
  made from the oracle (eps = (x - D(x, sigma_t)) / sigma_t at the scheduler's timestep t),
  in VP coordinates, betas recomputed in float64.
NFE counts denoiser calls; Heun-type samplers take the largest step count that fits the budget.

A second part times what a sampler spends outside the network per step (a denoiser that
returns a cached tensor, x of shape (64, 3, 32, 32)) against one forward of a small diffusers
UNet2DModel at batch 64, in the same process.

    PYTHONPATH=. .venv/bin/python bench/samplers.py            # full: ~550 s CPU, ~9 min on 2 busy cores
    PYTHONPATH=. .venv/bin/python bench/samplers.py --quick    # 500 samples, NFE 10 and 20: ~2 min
Writes <out>/samplers.md, <out>/samplers.png and <out>/samplers.json (default out: bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from difflab.core import GaussianMixture, sample, sigmas_karras, sigmas_logsnr, sigmas_spaced, vp_linear
from difflab.core.sampling import DEFAULT_SAMPLER, default_sigmas

F64 = torch.float64

# Sharp, unequal components: stds 0.02-0.2 (log-uniform) against means spread ~N(0, spread^2)
# per dimension, weights in [0.2, 1.2] before normalisation. Fixed seeds; one recipe for all.
MIXTURES = [
    dict(dim=2, k=8, seed=11, spread=1.5),
    dict(dim=16, k=10, seed=12, spread=1.0),
    dict(dim=64, k=16, seed=13, spread=1.0),
]
STD_RANGE = (0.02, 0.2)
NOISE_SEED = 100  # + dim
NFES = (5, 10, 20, 50)
TARGET_NFES = (10, 20)


# --------------------------------------------------------------------------------------------
# Configurations: name -> run(gm, x, nfe) -> (x_out, nfe_used)
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    family: str  # "ours" | "k-diffusion" | "diffusers"
    run: Callable  # (gm, x_ve, nfe) -> (out, nfe_used)


def _two_eval_steps(nfe: int) -> int:
    """Steps of a Heun-type sampler (2 calls per step, 1 on the last step to 0) within nfe calls."""
    return max(1, (nfe + 1) // 2)


def our_configs(sched) -> list[Config]:
    smin, smax = sched.sigma_min, sched.sigma_max
    grids = {
        "default": lambda n: default_sigmas(sched, n),
        "logsnr": lambda n: sigmas_logsnr(n, smin, smax),
        "karras7": lambda n: sigmas_karras(n, smin, smax, 7.0),
        "karras15": lambda n: sigmas_karras(n, smin, smax, 15.0),
        "trailing": lambda n: sigmas_spaced(sched, n, "trailing"),
    }
    samplers = {  # name -> (method, kwargs, two calls per step)
        "euler": ("euler", {}, False),
        "heun": ("heun", {}, True),
        "dpmpp_2m": ("dpmpp_2m", {}, False),
        "dpmpp_3m": ("dpmpp_3m", {}, False),
        "unipc2": ("unipc", dict(order=2), False),
        "unipc3": ("unipc", dict(order=3), False),
        "unipc_auto": ("unipc_auto", {}, False),
        "unipc_auto, denoise end": ("unipc", dict(order="auto", variant="vary", final="denoise"), False),
        "unipc_auto, bh2": ("unipc", dict(order="auto", variant="bh2", final="trapezoid"), False),
    }
    out = []
    for sname, (method, kw, two) in samplers.items():
        for gname, grid in grids.items():
            if "," in sname and gname != "default":  # ablations of the default: its grid only
                continue

            def run(gm, x, nfe, method=method, kw=kw, two=two, grid=grid):
                n = _two_eval_steps(nfe) if two else nfe
                return sample(gm.denoiser, x, grid(n), method=method, **kw), (2 * n - 1 if two else n)

            label = f"{sname} / {gname}"
            if method == DEFAULT_SAMPLER and gname == "default":
                label += "  (DEFAULT)"
            out.append(Config(label, "ours", run))
    return out


def kdiff_configs(sched) -> list[Config]:
    from tests.refs import k_sampling

    K = k_sampling()
    smin, smax = sched.sigma_min, sched.sigma_max

    def vp_grid(n):  # continuous VP of the same betas (beta_min 0.1, beta_d 19.9); starts at ~152
        g = K.get_sigmas_vp(n).to(F64)
        g[0] = smax  # start from the same noise level as everyone else
        return g

    grids = {
        "karras": lambda n: K.get_sigmas_karras(n, smin, smax).to(F64),
        "exponential": lambda n: K.get_sigmas_exponential(n, smin, smax).to(F64),
        "polyexp0.5": lambda n: K.get_sigmas_polyexponential(n, smin, smax, rho=0.5).to(F64),
        "polyexp2": lambda n: K.get_sigmas_polyexponential(n, smin, smax, rho=2.0).to(F64),
        "vp": vp_grid,
    }
    samplers = {  # name -> (fn, kwargs, two calls per step)
        "euler": (K.sample_euler, {}, False),
        "heun": (K.sample_heun, {}, True),
        "dpm_2": (K.sample_dpm_2, {}, True),
        "lms": (K.sample_lms, {}, False),
        "dpmpp_2m": (K.sample_dpmpp_2m, {}, False),
        "dpmpp_2m_sde(eta=0,heun)": (K.sample_dpmpp_2m_sde, dict(eta=0.0, solver_type="heun"), False),
        "dpmpp_3m_sde(eta=0)": (K.sample_dpmpp_3m_sde, dict(eta=0.0), False),
    }
    out = []
    for sname, (fn, kw, two) in samplers.items():
        for gname, grid in grids.items():

            def run(gm, x, nfe, fn=fn, kw=kw, two=two, grid=grid):
                n = _two_eval_steps(nfe) if two else nfe
                return fn(gm.denoiser, x, grid(n), disable=True, **kw), (2 * n - 1 if two else n)

            out.append(Config(f"k {sname} / {gname}", "k-diffusion", run))

    def run_fast(gm, x, nfe):  # DPM-Solver-fast to sigma_min in nfe - 1 calls, then x0_hat
        y = K.sample_dpm_fast(gm.denoiser, x, smin, smax, nfe - 1, disable=True)
        return gm.denoiser(y, smin), nfe

    out.append(Config("k dpm_fast (+ final x0_hat)", "k-diffusion", run_fast))
    return out


def _float64_scheduler(ref):
    """diffusers builds its betas in float32; recompute them (linspace(1e-4, 0.02)) in float64."""
    ref.betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    if hasattr(ref, "alpha_t"):
        ref.alpha_t = ref.alphas_cumprod.sqrt()
        ref.sigma_t = (1 - ref.alphas_cumprod).sqrt()
        ref.lambda_t = ref.alpha_t.log() - ref.sigma_t.log()
        ref.sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    return ref


def diffusers_configs(sched) -> list[Config]:
    import diffusers

    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    makers = {
        "DDIM eta=0 / trailing": lambda: diffusers.DDIMScheduler(
            **base, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"
        ),
        "DDIM eta=0 / leading": lambda: diffusers.DDIMScheduler(
            **base, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading"
        ),
        "DPM++(2M) / linspace": lambda: diffusers.DPMSolverMultistepScheduler(
            **base, algorithm_type="dpmsolver++", solver_order=2
        ),
        "DPM++(2M) / karras": lambda: diffusers.DPMSolverMultistepScheduler(
            **base, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        ),
        "DPM++(2M) / exponential": lambda: diffusers.DPMSolverMultistepScheduler(
            **base, algorithm_type="dpmsolver++", solver_order=2, use_exponential_sigmas=True
        ),
        "UniPC-2 bh2 / linspace": lambda: diffusers.UniPCMultistepScheduler(**base, solver_order=2),
        "UniPC-3 bh2 / linspace": lambda: diffusers.UniPCMultistepScheduler(**base, solver_order=3),
        "UniPC-2 bh2 / karras": lambda: diffusers.UniPCMultistepScheduler(
            **base, solver_order=2, use_karras_sigmas=True
        ),
        "UniPC-3 bh2 / karras": lambda: diffusers.UniPCMultistepScheduler(
            **base, solver_order=3, use_karras_sigmas=True
        ),
    }
    smax = sched.sigma_max

    def make_run(make):
        def run(gm, x, nfe):
            ref = _float64_scheduler(make())
            ref.set_timesteps(nfe)
            if hasattr(ref, "sigmas"):
                ref.sigmas = ref.sigmas.to(F64)
            x_vp = x / math.sqrt(1 + smax**2)  # the same noise, in the model's VP coordinates
            for t in ref.timesteps:
                sigma_t = float(sched.sigma(float(t)))  # the noise level a network at step t assumes
                x_ve = x_vp * math.sqrt(1 + sigma_t**2)
                eps = (x_ve - gm.denoiser(x_ve, sigma_t)) / sigma_t
                x_vp = ref.step(eps.to(F64), t, x_vp).prev_sample.to(F64)
            return x_vp, len(ref.timesteps)  # ends at abar = 1, where VP and VE coincide

        return run

    return [Config(f"d {name}", "diffusers", make_run(make)) for name, make in makers.items()]


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def make_mixture(spec) -> GaussianMixture:
    return GaussianMixture.random(spec["dim"], spec["k"], spec["seed"], spread=spec["spread"], std_range=STD_RANGE)


def measure(gm, out, ref, comp_ref) -> dict:
    err = (out - ref).norm(dim=1)
    flips = (gm.responsibilities(out, 0.0).argmax(1) != comp_ref).double().mean().item()
    return dict(
        median=err.median().item(), p90=err.quantile(0.9).item(), flips=flips, finite=bool(torch.isfinite(out).all())
    )


# State shared with forked worker processes (configurations hold closures, which do not pickle).
_SHARED: dict = {}


def _worker_init():
    torch.set_num_threads(1)


def _reference(i: int):
    """Starting noise and exact probability-flow endpoints for mixture i."""
    spec, n_samples, sigma_max = _SHARED["mixtures"][i], _SHARED["n_samples"], _SHARED["sigma_max"]
    d = spec["dim"]
    x = torch.randn(n_samples, d, generator=torch.Generator().manual_seed(NOISE_SEED + d), dtype=F64) * sigma_max
    c0 = time.process_time()
    ref = make_mixture(spec).pf_endpoint(x, sigma_max)
    return i, x, ref, time.process_time() - c0


def _evaluate(task):
    """All NFEs of configuration j on mixture i."""
    i, j = task
    gm, x, ref, comp_ref = _SHARED["data"][i]
    c0 = time.process_time()
    row = {}
    for nfe in _SHARED["nfes"]:
        with torch.no_grad():
            out, used = _SHARED["configs"][j].run(gm, x, nfe)
        row[nfe] = dict(measure(gm, out.to(F64), ref, comp_ref), nfe=used)
    return i, j, row, time.process_time() - c0


def _map(fn, items, workers):
    if workers <= 1:
        return map(fn, items)
    import multiprocessing as mp

    pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)
    try:
        return list(pool.imap_unordered(fn, items, chunksize=1))
    finally:
        pool.close()
        pool.join()


def run_accuracy(configs, mixtures, n_samples, nfes, log, workers: int = 2) -> dict:
    sched = vp_linear()
    _SHARED.update(configs=configs, mixtures=mixtures, n_samples=n_samples, nfes=nfes, sigma_max=sched.sigma_max)
    data = {}
    cpu = 0.0
    for i, x, ref, secs in _map(_reference, range(len(mixtures)), workers):
        gm = make_mixture(mixtures[i])
        data[i] = (gm, x, ref, gm.responsibilities(ref, 0.0).argmax(1))
        cpu += secs
        log(f"[{mixtures[i]['dim']}-D] exact probability-flow endpoints of {n_samples} samples: {secs:.1f} s CPU")
    _SHARED["data"] = data
    t0 = time.time()
    # the expensive mixtures first, so the two workers finish together
    tasks = [(i, j) for i in sorted(data, key=lambda i: -mixtures[i]["dim"]) for j in range(len(configs))]
    results = {m["dim"]: {} for m in mixtures}
    rows = {}
    for i, j, row, secs in _map(_evaluate, tasks, workers):
        rows[i, j] = row
        cpu += secs
    for i, m in enumerate(mixtures):
        for j, cfg in enumerate(configs):  # in configuration order
            results[m["dim"]][cfg.name] = dict(family=cfg.family, cells=rows[i, j])
    log(
        f"{len(configs)} configurations x {len(mixtures)} mixtures x NFE {list(nfes)}: {time.time() - t0:.1f} s "
        f"({workers} worker process{'es' if workers > 1 else ''}); accuracy part {cpu:.0f} s CPU in all"
    )
    return results


def best(res: dict, nfe: int, family_pred) -> tuple[str, dict]:
    cands = [
        (v["cells"][nfe]["median"], k)
        for k, v in res.items()
        if family_pred(v["family"]) and math.isfinite(v["cells"][nfe]["median"])
    ]
    _, name = min(cands)
    return name, res[name]["cells"][nfe]


DEFAULT_NAME = f"{DEFAULT_SAMPLER} / default  (DEFAULT)"


def summarize(results: dict, nfes) -> list[dict]:
    rows = []
    for d, res in results.items():
        for nfe in nfes:
            dflt = res[DEFAULT_NAME]["cells"][nfe]
            ours_name, ours = best(res, nfe, lambda f: f == "ours")
            peer_name, peer = best(res, nfe, lambda f: f != "ours")
            min_peer_flips = min(v["cells"][nfe]["flips"] for v in res.values() if v["family"] != "ours")
            ratio = dflt["median"] / peer["median"]
            rows.append(
                dict(
                    dim=d,
                    nfe=nfe,
                    default=dflt,
                    best_ours=ours_name,
                    best_ours_cell=ours,
                    best_peer=peer_name,
                    peer=peer,
                    ratio=ratio,
                    min_peer_flips=min_peer_flips,
                    met=(ratio <= 0.5 and dflt["flips"] <= peer["flips"]),
                )
            )
    return rows


def recipes_meeting_target(results: dict, nfes) -> list[tuple[str, int, float]]:
    """For each of our configurations: (name, target cells met, geometric-mean ratio to the best peer)."""
    cells = [(d, n) for d in results for n in nfes if n in TARGET_NFES]
    out = []
    for name, v in next(iter(results.values())).items():
        if v["family"] != "ours":
            continue
        met, logs = 0, []
        for d, n in cells:
            c = results[d][name]["cells"][n]
            _, peer = best(results[d], n, lambda f: f != "ours")
            ratio = c["median"] / peer["median"]
            met += ratio <= 0.5 and c["flips"] <= peer["flips"]
            logs.append(math.log(ratio) if ratio > 0 and math.isfinite(ratio) else math.inf)
        out.append((name, met, math.exp(sum(logs) / len(logs)) if logs else math.nan))
    out.sort(key=lambda t: (-t[1], t[2]))
    return out


# --------------------------------------------------------------------------------------------
# Time outside the network
# --------------------------------------------------------------------------------------------


def run_overhead(steps: int, repeats: int, log) -> dict:
    import diffusers
    from tests.refs import k_sampling

    K = k_sampling()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(64, 3, 32, 32)
    x0_cached = torch.randn(64, 3, 32, 32)
    t_unet = torch.full((64,), 500)

    def trivial(x, sigma, **cond):
        return x0_cached

    sched = vp_linear()
    sig = default_sigmas(sched, steps).float()
    cases = {
        "ours euler": lambda: sample(trivial, x, sig, method="euler"),
        "ours heun": lambda: sample(trivial, x, sig, method="heun"),
        "ours dpmpp_2m": lambda: sample(trivial, x, sig, method="dpmpp_2m"),
        "ours dpmpp_3m": lambda: sample(trivial, x, sig, method="dpmpp_3m"),
        "ours unipc (order 3)": lambda: sample(trivial, x, sig, method="unipc"),
        f"ours {DEFAULT_SAMPLER} (DEFAULT)": lambda: sample(trivial, x, sig),
        "k dpmpp_2m": lambda: K.sample_dpmpp_2m(trivial, x, sig, disable=True),
        "k heun": lambda: K.sample_heun(trivial, x, sig, disable=True),
    }
    calls = {"ours heun": 2 * steps - 1, "k heun": 2 * steps - 1}
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    unet_wall, unet_cpu = [], []

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        unet(x, t_unet)  # warm-up
        for fn in cases.values():
            fn()
        for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
            w, c = timed(lambda: unet(x, t_unet))
            unet_wall.append(w)
            unet_cpu.append(c)
            for name, fn in cases.items():
                w, c = timed(fn)
                wall[name].append(w / steps)
                cpu[name].append(c / steps)
    med = statistics.median
    out = dict(
        unet_ms=1e3 * med(unet_wall),
        unet_cpu_ms=1e3 * med(unet_cpu),
        unet_params=n_params,
        steps=steps,
        repeats=repeats,
        threads=torch.get_num_threads(),
        samplers={},
    )
    for name in cases:
        ms, cpu_ms = 1e3 * med(wall[name]), 1e3 * med(cpu[name])
        out["samplers"][name] = dict(
            ms_per_step=ms,
            cpu_ms_per_step=cpu_ms,
            calls_per_step=calls.get(name, steps) / steps,
            ratio=ms / out["unet_ms"],
            cpu_ratio=cpu_ms / out["unet_cpu_ms"],
        )
    log(
        f"UNet2DModel ({n_params / 1e6:.2f} M params) forward at batch 64: {out['unet_ms']:.1f} ms wall, "
        f"{out['unet_cpu_ms']:.1f} ms CPU (median of {repeats})"
    )
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(c):
    return f"{c['median']:.2e} | {c['p90']:.2e} | {100 * c['flips']:.2f}"


def write_markdown(path: Path, results, summary, overhead, args, nfes, n_samples, mixtures):
    L = []
    L.append("# Sampler accuracy against NFE: Gaussian mixtures, DDPM linear schedule\n")
    L.append(
        f"Generated by `{' '.join(['bench/samplers.py'] + sys.argv[1:])}`. Samples per mixture: "
        f"{n_samples}; start x = sigma_max * randn at sigma_max = {vp_linear().sigma_max:.2f}; "
        "reference = exact "
        "probability-flow endpoint (DOP853, rtol = atol = 1e-10). Error = |x - x_exact| per sample; "
        "flips = % of samples whose argmax component at sigma = 0 differs from the exact endpoint's. "
        f"Default recipe: `sample(D, x, default_sigmas(schedule, n))` = `{DEFAULT_SAMPLER}` on "
        "`sigmas_soft_logsnr`.\n"
    )
    L.append(
        "Mixtures: "
        + "; ".join(
            f"{m['dim']}-D, {m['k']} components, seed {m['seed']}, "
            f"spread {m['spread']}, "
            f"stds {STD_RANGE[0]}-{STD_RANGE[1]}"
            for m in mixtures
        )
        + ".\n"
    )
    L.append("## Summary: the default recipe against the best peer configuration (lowest median)\n")
    L.append(
        "| dim | NFE | default: median / p90 / flips % | best peer | peer: median / p90 / flips % "
        "| default / peer median | target (<= 0.5x, flips <=) | best of ours |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for r in summary:
        star = "" if r["nfe"] in TARGET_NFES else " (not a target NFE)"
        L.append(
            f"| {r['dim']} | {r['nfe']} | {_fmt(r['default']).replace(' | ', ' / ')} | {r['best_peer']} | "
            f"{_fmt(r['peer']).replace(' | ', ' / ')} | {r['ratio']:.2f} | "
            f"{'met' if r['met'] else 'NOT met'}{star} | {r['best_ours']} |"
        )
    L.append("")
    recipes = recipes_meeting_target(results, nfes)
    n_cells = sum(1 for d in results for n in nfes if n in TARGET_NFES)
    nfe_list = ", ".join(map(str, TARGET_NFES))
    L.append(f"## Which of our fixed recipes meet the target in all {n_cells} cells (NFE {nfe_list})\n")
    L.append(
        "Each row is one recipe used unchanged on every mixture. Geometric mean of median / best-peer median "
        "over the target cells.\n"
    )
    L.append("| recipe | cells met | geometric-mean ratio |")
    L.append("|---|---|---|")
    for name, met, gm_ratio in recipes[:12]:
        label = f"**{name}**" if name == DEFAULT_NAME else name
        L.append(f"| {label} | {met} / {n_cells} | {gm_ratio:.2f} |")
    L.append("")
    for d, res in results.items():
        L.append(f"## {d}-D: every configuration\n")
        L.append(
            "median | p90 | flips % at each NFE; NFE actually used in brackets where it is below the budget "
            "(Heun-type samplers). Ratio = median / best peer median at that NFE.\n"
        )
        head = "| configuration | " + " | ".join(f"NFE {n}: median | p90 | flips % | ratio" for n in nfes) + " |"
        L.append(head)
        L.append("|---|" + "---|---|---|---|" * len(nfes))
        peer_best = {n: best(res, n, lambda f: f != "ours")[1]["median"] for n in nfes}
        for fam in ("ours", "diffusers", "k-diffusion"):
            for name, v in res.items():
                if v["family"] != fam:
                    continue
                cells = []
                for n in nfes:
                    c = v["cells"][n]
                    used = f" [{c['nfe']}]" if c["nfe"] != n else ""
                    cells.append(f"{_fmt(c)}{used} | {c['median'] / peer_best[n]:.2f}")
                label = f"**{name}**" if name == DEFAULT_NAME else name
                L.append(f"| {label} | " + " | ".join(cells) + " |")
        L.append("")
    if overhead:
        L.append("## Time outside the network\n")
        L.append(
            f"Trivial denoiser (returns a cached tensor), x of shape (64, 3, 32, 32) float32, "
            f"{overhead['steps']} steps on the default grid, against one forward of a diffusers UNet2DModel "
            f"(block_out_channels (32, 64, 64), layers_per_block 1, "
            f"{overhead['unet_params'] / 1e6:.2f} M params) "
            f"at batch 64: **{overhead['unet_ms']:.1f} ms wall, {overhead['unet_cpu_ms']:.1f} ms CPU**. "
            f"Medians of {overhead['repeats']} interleaved runs in one process, "
            f"{overhead['threads']} thread(s); "
            "CPU time (process_time) is the figure that other load on the machine does not inflate.\n"
        )
        L.append(
            "| sampler | network calls per step | ms per step outside the network (wall / CPU) "
            "| share of one UNet forward (wall / CPU) |"
        )
        L.append("|---|---|---|---|")
        for name, o in overhead["samplers"].items():
            L.append(
                f"| {name} | {o['calls_per_step']:.2f} | "
                f"{o['ms_per_step']:.3f} / {o['cpu_ms_per_step']:.3f} | "
                f"{100 * o['ratio']:.3f} % / {100 * o['cpu_ratio']:.3f} % |"
            )
        L.append("")
    path.write_text("\n".join(L))


def plot(path: Path, results, nfes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.NullFormatter below)

    dims = list(results)
    fig, axes = plt.subplots(1, len(dims), figsize=(5.2 * len(dims), 5.0), squeeze=False)
    named_peers = [
        "d DPM++(2M) / karras",
        "d UniPC-2 bh2 / linspace",
        "d DDIM eta=0 / trailing",
        "k dpmpp_2m / karras",
        "k dpmpp_2m / exponential",
        "k heun / karras",
    ]
    for ax, d in zip(axes[0], dims):
        res = results[d]
        xs = list(nfes)
        for name in named_peers:
            if name in res:
                ax.plot(xs, [res[name]["cells"][n]["median"] for n in xs], "--", lw=1, alpha=0.8, label=name)
        peer = [best(res, n, lambda f: f != "ours")[1]["median"] for n in xs]
        ours = [best(res, n, lambda f: f == "ours")[1]["median"] for n in xs]
        ax.plot(xs, peer, "k-", lw=2, label="best peer config at each NFE")
        ax.plot(xs, ours, "-", color="tab:green", lw=1.5, alpha=0.6, label="best difflab config at each NFE")
        ax.plot(
            xs,
            [res[DEFAULT_NAME]["cells"][n]["median"] for n in xs],
            "o-",
            color="tab:red",
            lw=2.5,
            label=f"difflab default ({DEFAULT_SAMPLER} + default_sigmas)",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(n) for n in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("NFE (denoiser calls)")
        ax.set_ylabel("median |x - exact PF endpoint|")
        ax.set_title(f"{d}-D Gaussian mixture")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and NFE 10, 20 only (~1 min)")
    p.add_argument("--out", default="bench/results", help="folder for samplers.md/.png/.json")
    p.add_argument("--samples", type=int, help="samples per mixture (default 2000, quick 500)")
    p.add_argument(
        "--mixture-seeds",
        help="comma-separated seeds replacing the three fixed ones (held-out check of the one recipe)",
    )
    p.add_argument("--no-overhead", action="store_true", help="skip the time-outside-the-network part")
    p.add_argument("--workers", type=int, default=2, help="processes for the accuracy part (default 2)")
    args = p.parse_args(argv)
    n_samples = args.samples or (500 if args.quick else 2000)
    nfes = TARGET_NFES if args.quick else NFES
    mixtures = [dict(m) for m in MIXTURES]
    if args.mixture_seeds:
        seeds = [int(s) for s in args.mixture_seeds.split(",")]
        if len(seeds) != len(mixtures):
            raise SystemExit(f"--mixture-seeds needs {len(mixtures)} seeds, got {seeds}")
        for m, s in zip(mixtures, seeds):
            m["seed"] = s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)

    sched = vp_linear()
    configs = our_configs(sched) + diffusers_configs(sched) + kdiff_configs(sched)
    torch.set_num_threads(1)  # one thread throughout: fastest for these small tensors, and CPU time is clean
    results = run_accuracy(configs, mixtures, n_samples, nfes, log, workers=args.workers)
    summary = summarize(results, nfes)
    overhead = None if args.no_overhead else run_overhead(steps=20, repeats=5 if args.quick else 11, log=log)

    write_markdown(out_dir / "samplers.md", results, summary, overhead, args, nfes, n_samples, mixtures)
    plot(out_dir / "samplers.png", results, nfes)
    (out_dir / "samplers.json").write_text(
        json.dumps(
            dict(
                mixtures=mixtures,
                samples=n_samples,
                nfes=list(nfes),
                results={str(k): v for k, v in results.items()},
                summary=summary,
                overhead=overhead,
            ),
            indent=1,
            default=str,
        )
    )

    print("\nDefault recipe vs best peer (median / p90 / flips %):")
    for r in summary:
        tag = ("met" if r["met"] else "NOT met") if r["nfe"] in TARGET_NFES else "-"
        print(
            f"  {r['dim']:3d}-D NFE {r['nfe']:3d}: default {_fmt(r['default']).replace(' | ', ' / ')}  "
            f"| best peer {r['best_peer']}: {_fmt(r['peer']).replace(' | ', ' / ')}  "
            f"| ratio {r['ratio']:.2f} | target {tag}"
        )
        if r["best_ours"] != DEFAULT_NAME:
            c = r["best_ours_cell"]
            print(f"           (a non-default difflab config is better here: {r['best_ours']} {c['median']:.2e})")
    n_cells = sum(1 for d in results for n in nfes if n in TARGET_NFES)
    print(f"\nOur recipes by target cells met (of {n_cells}) and geometric-mean ratio to the best peer:")
    for name, met, gm_ratio in recipes_meeting_target(results, nfes)[:6]:
        print(f"  {name:40s} {met} / {n_cells}  {gm_ratio:.2f}")
    if overhead:
        for name, o in overhead["samplers"].items():
            print(
                f"  outside the network, {name:24s}: {o['ms_per_step']:7.3f} ms wall, "
                f"{o['cpu_ms_per_step']:7.3f} ms CPU "
                f"per step = {100 * o['ratio']:.3f} % / {100 * o['cpu_ratio']:.3f} % of a UNet forward "
                f"({overhead['unet_ms']:.0f} / {overhead['unet_cpu_ms']:.0f} ms)"
            )
    print(f"\nwrote {out_dir / 'samplers.md'}, {out_dir / 'samplers.png'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
