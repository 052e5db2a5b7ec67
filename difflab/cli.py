"""The `difflab` command (also `python -m difflab`): train, sample, eval, demo, demo-toy,
train-autoencoder, train-classifier, train-clip, edit, reproduce, ui."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difflab.core.validation import (
    add_memory_argument,
    add_device_arguments,
    FINITE,
    LR,
    NONNEG_INT,
    POS_INT,
    POSITIVE,
    SEED,
    UNIT,
    check_output_file,
    check_output_folder,
)

# --------------------------------------------------------------------------------------------
# difflab train
# --------------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace):
    from difflab.train import TrainConfig

    values = {}
    if args.recipe:
        from difflab.train import RECIPES

        values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPES[args.recipe].items()}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"difflab train: config file {path} does not exist")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"difflab train: {path} is not valid JSON: {e}")
        loaded = loaded.get("train", loaded)  # accept a run's config.json too
        values = {**values, **loaded}  # --config's fields win over --recipe's
    flags = {
        "data": args.data,
        "model": args.model,
        "steps": args.steps,
        "minutes": args.minutes,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "save_every": args.save_every,
        "lr": args.lr,
        "bf16": args.bf16 or None,
        "clock": args.clock,
        "text_encoder": args.text_encoder,
        "caption_dropout": args.caption_dropout,
        "autoencoder": args.autoencoder,
        "init_from": args.init_from,
        "finetune": args.finetune,
        "lora_rank": args.lora_rank,
        "gradient_checkpointing": args.gradient_checkpointing or None,
    }
    if args.init_from:  # the base fixes the architecture: flags that would change it contradict it
        given = [
            f
            for f, v in (
                ("--model", args.model),
                ("--conditioning", args.conditioning),
                ("--text-encoder", args.text_encoder),
                ("--autoencoder", args.autoencoder),
                ("--unconditional", args.unconditional),
            )
            if v
        ]
        if given:
            raise SystemExit(f"difflab train: --init-from takes the network from the base run; drop {', '.join(given)}")
    conditioning = args.conditioning
    if args.unconditional:
        if conditioning not in (None, "none"):
            raise SystemExit(f"difflab train: --unconditional contradicts --conditioning {conditioning}")
        conditioning = "none"
    if conditioning is not None:  # replaces the older class_conditional of a loaded config
        values.pop("class_conditional", None)
        flags["conditioning"] = conditioning
    values.update({k: v for k, v in flags.items() if v is not None})
    for flag, value in (("--text-encoder", args.text_encoder), ("--caption-dropout", args.caption_dropout)):
        if value is not None and values.get("conditioning") != "text" and not args.init_from:
            raise SystemExit(f"difflab train: {flag} needs --conditioning text")
    if args.minutes is not None and args.steps is None:
        values["steps"] = None
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"difflab train: {e}")


def _cmd_train(args: argparse.Namespace) -> int:
    from difflab.train import train

    check_output_folder(args.out, what="--out")
    cfg = _train_config(args)
    out = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"run folder: {out} (config.json, model.safetensors, checkpoint.safetensors, loss.png)")
    return 0


# --------------------------------------------------------------------------------------------
# difflab sample
# --------------------------------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    from difflab.data import save_image_grid
    from difflab.assets import resolve_run
    from difflab.pipeline import Pipeline

    check_output_file(args.out, what="--out")
    if (args.classifier is None) != (args.classifier_guidance is None):
        raise ValueError("--classifier-guidance SCALE and --classifier FOLDER go together")
    pipe = Pipeline.from_pretrained(resolve_run(args.run)).to(args.device, args.dtype)  # a folder or a zoo name
    if args.low_memory:
        pipe.enable_low_memory()
    clf = None if args.classifier is None else pipe.load_classifier(args.classifier)
    k = pipe.num_classes if clf is None else clf.config.num_classes
    labels = args.label
    if labels is None and k is not None and pipe.conditioning != "text":
        labels = [i % k for i in range(args.n)]
    prompts = None if args.prompt is None else [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    images = pipe(
        args.n,
        prompt=prompts,
        negative_prompt=args.negative_prompt,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        classifier=clf,
        classifier_scale=args.classifier_guidance or 0.0,
        truncate=args.truncate,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        progress=True,
    )
    names = pipe.class_names
    captions = prompts
    if labels is not None and names:
        lab = labels if isinstance(labels, list) else [labels] * args.n
        captions = [names[i] for i in lab]
    save_image_grid(images, args.out, labels=captions)
    print(f"wrote {args.out} ({args.n} samples, {args.sampler}, {args.steps} steps)")
    return 0


# --------------------------------------------------------------------------------------------
# difflab demo-toy
# --------------------------------------------------------------------------------------------


def _cmd_demo_toy(args: argparse.Namespace) -> int:
    """Sampler demo on a 2-D Gaussian mixture with an exact denoiser: samples and errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from difflab.core import GaussianMixture, sample, sigmas_karras

    check_output_file(args.out, suffixes={".png", ".pdf", ".svg", ".jpg", ".jpeg"}, what="--out")

    gm = GaussianMixture.random(dim=2, k=6, seed=args.seed, spread=2.0, std_range=(0.05, 0.3))
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64) * 80.0
    exact = gm.pf_endpoint(x, 80.0)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, name in zip(axes, ["euler", "dpmpp_2m", "unipc", "euler_ancestral"]):
        out = sample(
            gm.denoiser, x, sigmas_karras(10, 0.002, 80.0), method=name, noise=torch.Generator().manual_seed(1)
        )
        err = (out - exact).norm(dim=1).median().item()
        ax.scatter(*gm.sample(2000, g)[0].T, s=2, alpha=0.3, label="data")
        ax.scatter(*out.T, s=2, alpha=0.5, label="samples")
        ax.set_title(f"{name}, 10 steps\nmedian |x - exact PF| = {err:.2e}")
        ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses as dc

    from difflab.demo import TourBudget, run_demo

    check_output_folder(args.out, what="--out")
    budget = TourBudget.tiny() if args.quick else TourBudget()
    changes = {
        k: v
        for k, v in (("n_eval", args.n_eval), ("train_steps", args.train_steps), ("steps", args.steps))
        if v is not None
    }
    for name, v in changes.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    run_demo(out=args.out, data=args.data, seed=args.seed, prompts=args.prompt, budget=dc.replace(budget, **changes))
    return 0


# --------------------------------------------------------------------------------------------
# difflab eval
# --------------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    """FD, precision/recall, IS analogue and bits/dim of a run; prints a table, writes JSON."""
    from difflab.metrics.evaluate import evaluate_run, format_report, write_report

    if args.bpd_timesteps == "all":
        timesteps = None
    elif args.bpd_timesteps.isdigit() and int(args.bpd_timesteps) > 0:
        timesteps = int(args.bpd_timesteps)
    else:
        raise ValueError(f"--bpd-timesteps must be a positive integer or 'all', got {args.bpd_timesteps!r}")
    out = check_output_file(args.out or Path(args.run) / "eval.json", suffixes={".json"}, what="--out")
    report = evaluate_run(
        args.run,
        sampler=args.sampler,
        steps=args.steps,
        n=args.n,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        extractor=args.extractor,
        inception_weights=args.inception_weights,
        bpd=args.bpd,
        bpd_n=args.bpd_n,
        bpd_timesteps=timesteps,
        hutchinson=args.hutchinson,
        recompute_stats=args.recompute_stats,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        clip_model=args.clip_model,
        progress=not args.no_progress,
    )
    print(format_report(report), flush=True)  # the scores first: a failed write cannot lose them
    out = write_report(report, out)
    print(f"wrote {out}")
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    """FID and KID between two image folders, by the published conventions (difflab.metrics.standard)."""
    from difflab.metrics.standard import fid_folders

    out = check_output_file(args.out, suffixes={".json"}, what="--out") if args.out else None
    r = fid_folders(
        args.dir_a,
        args.dir_b,
        args.inception_weights,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        batch_size=args.batch_size,
        resize=args.resize,
        device=args.device,
        progress=not args.no_progress,
    )
    print(
        f"FID {r['fid']:.4f}  KID {r['kid']:.6f} +- {r['kid_std']:.6f}  ({r['n_a']} vs {r['n_b']} images, "
        f"uint8, {r['resize']} resize, Inception {r['inception_sha256'][:12]})"
    )
    if out:
        from difflab.runfolder import write_json

        write_json(out, r)
        print(f"wrote {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A run folder or zoo model as a diffusers folder (difflab.interop.export)."""
    from difflab.assets import resolve_run
    from difflab.interop.export import export_diffusers
    from difflab.pipeline import Pipeline

    run = resolve_run(args.run)  # a folder, or a zoo name
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist (nor is it a zoo model name)")
    zoo = json.loads((run / "zoo.json").read_text()) if (run / "zoo.json").is_file() else None
    out = export_diffusers(Pipeline.from_pretrained(run, weights=args.weights), args.out, zoo=zoo)
    print(f"wrote {out} (diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True) loads it)")
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from difflab.core.sampling import DEFAULT_SAMPLER, SAMPLERS

    p = argparse.ArgumentParser(prog="difflab", description="The diffusion-models reading list, implemented.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a diffusion model; writes a run folder",
        description="Train a diffusion model (EDM preconditioning by default). Flags override "
        "--config (a JSON file of TrainConfig fields, or a run's config.json).",
    )
    t.add_argument("--data", help="digits | fashion_mnist | shapes | folder:PATH (default fashion_mnist)")
    t.add_argument("--model", help="unet-xs | unet-s | unet-m | DiT-T/2 ... (default unet-s)")
    t.add_argument("--out", required=True, help="run folder to write (or to resume)")
    t.add_argument(
        "--recipe",
        choices=("edm", "ddpm", "iddpm"),
        help="the paper's objective: edm (Karras et al. 2022, the default), ddpm (Ho et al. 2020: eps, linear "
        "betas, T = 1000, L_simple), iddpm (Nichol & Dhariwal 2021: cosine betas, learned variances by L_hybrid)",
    )
    t.add_argument("--steps", type=POS_INT, help="budget in optimizer steps (default 2000)")
    t.add_argument("--minutes", type=POSITIVE, help="budget in minutes instead of steps (see --clock)")
    t.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        help="what --minutes counts: wall time (default) or this process's CPU time, a fair "
        "budget on a shared machine (20 CPU-minutes = 10 minutes of 2 cores)",
    )
    t.add_argument("--batch-size", type=POS_INT)
    t.add_argument("--lr", type=LR)
    t.add_argument("--seed", type=SEED)
    t.add_argument("--save-every", type=NONNEG_INT, help="steps between checkpoints")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each network stage in the backward pass: less memory, about a third more compute",
    )
    t.add_argument(
        "--init-from",
        metavar="RUN",
        help="fine-tune: start from this run folder or zoo model (its network, schedule, conditioning, text "
        "encoder and autoencoder) instead of random weights",
    )
    t.add_argument(
        "--finetune",
        choices=("all", "lora"),
        help="what --init-from trains: all = every denoiser weight; lora = rank --lora-rank adapters on the "
        "attention projections (the run folder holds only them); text encoder and autoencoder stay frozen",
    )
    t.add_argument("--lora-rank", type=POS_INT, help="LoRA rank (default 4)")
    t.add_argument("--unconditional", action="store_true", help="ignore class labels (= --conditioning none)")
    t.add_argument(
        "--conditioning",
        choices=("class", "text", "none"),
        help="class labels (default), captions through cross-attention (text), or none",
    )
    t.add_argument(
        "--text-encoder",
        choices=("minilm", "word"),
        help="text: frozen pretrained MiniLM (default; token states cached per caption) or a small "
        "word-level encoder trained jointly",
    )
    t.add_argument(
        "--caption-dropout",
        type=UNIT,
        help="text: probability of replacing a caption by the empty prompt, for classifier-free guidance (default 0.1)",
    )
    t.add_argument(
        "--autoencoder",
        metavar="FOLDER",
        help="latent diffusion: train on the scaled latents of this autoencoder folder "
        "(difflab train-autoencoder); sampling decodes with its copy in the run folder",
    )
    t.add_argument("--config", help="JSON config file (TrainConfig fields)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (without it, or --resume, an existing run is never touched)",
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="sample a grid of images from a run folder (or a diffusers folder)")
    add_device_arguments(s)
    add_memory_argument(s)
    s.add_argument("--run", required=True, help="run folder (config.json + model.safetensors)")
    s.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS))
    s.add_argument("--steps", type=POS_INT, default=20)
    s.add_argument("--n", type=POS_INT, default=64)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--label", type=NONNEG_INT, help="class label for every image (default: cycle through classes)")
    s.add_argument(
        "--prompt",
        action="append",
        help="text models: the prompt (repeat the flag to cycle through several); none = the empty prompt",
    )
    s.add_argument("--negative-prompt", help='text models: the unconditional branch of guidance instead of ""')
    s.add_argument(
        "--truncate", action="store_true", help="cut prompts longer than the text encoder takes (default: an error)"
    )
    s.add_argument(
        "--guidance-scale",
        "--guidance",
        dest="guidance_scale",
        type=FINITE,
        default=1.0,
        metavar="S",
        help="classifier-free guidance in the library convention D_u + S (D_c - D_u): S = 1 + w, where "
        "w is Ho & Salimans' paper weight in (1 + w) eps_c - w eps_u; S = 1 (w = 0) is no guidance",
    )
    s.add_argument(
        "--guidance-rescale",
        type=UNIT,
        default=0.0,
        metavar="PHI",
        help="guidance rescale phi in [0, 1] (Lin et al. 2024): match the guided x0's std to the "
        "conditional one's; acts only with S != 1 (default 0)",
    )
    s.add_argument(
        "--classifier-guidance",
        type=FINITE,
        metavar="SCALE",
        help="ADM classifier guidance: D + SCALE sigma^2 grad log p(y | x) with --classifier "
        "(class-conditional or unconditional pixel models; labels from --label or cycled)",
    )
    s.add_argument("--classifier", metavar="FOLDER", help="noise-aware classifier folder (difflab train-classifier)")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=_cmd_sample)

    ev = sub.add_parser(
        "eval",
        help="FD, precision/recall, IS analogue and bits/dim of a run (JSON)",
        description="Sample a run and score it: Frechet distance in a domain classifier's "
        "features (FD-FMNIST, FD-digits, FD-shapes) or Inception's (FID), "
        "precision/recall (k=3), an Inception-Score analogue, and bits/dim "
        "on test images. Reference statistics are cached per data set, split "
        "and extractor under $DIFFLAB_CACHE (default ~/.cache/difflab).",
    )
    ev.add_argument("--run", required=True, help="run folder (config.json + model.safetensors)")
    ev.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS))
    ev.add_argument("--steps", type=POS_INT, default=20)
    ev.add_argument("--n", type=POS_INT, default=10000, help="samples to score (default 10000)")
    ev.add_argument("--seed", type=SEED, default=0)
    ev.add_argument(
        "--guidance-scale",
        type=FINITE,
        default=1.0,
        help="classifier-free guidance s (1 = none; the paper's w = s - 1)",
    )
    ev.add_argument(
        "--extractor",
        choices=["fmnist", "digits", "shapes", "inception"],
        help="feature network (default: the run's data set's classifier)",
    )
    ev.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="standard Inception-v3 weights file (pt_inception-2015-12-05 .pth or torchvision's)",
    )
    ev.add_argument(
        "--bpd",
        choices=["vlb", "ode", "none"],
        default="vlb",
        help="bits/dim by the DDPM variational bound, the probability-flow ODE, or not at all",
    )
    ev.add_argument("--bpd-n", type=POS_INT, default=256, help="test images for bits/dim (default 256)")
    ev.add_argument(
        "--bpd-timesteps",
        default="100",
        help="VLB: strata over the schedule's T timesteps (an unbiased estimate), or 'all' (default 100)",
    )
    ev.add_argument("--hutchinson", type=NONNEG_INT, default=1, help="ODE: Hutchinson probes (0 = exact divergence)")
    ev.add_argument("--recompute-stats", action="store_true", help="rebuild the cached reference statistics")
    ev.add_argument("--batch-size", type=POS_INT, default=256)
    ev.add_argument("--out", help="JSON report (default RUN/eval.json)")
    ev.add_argument(
        "--clip-model",
        metavar="FOLDER",
        help="a transformers CLIP folder: adds the CLIP score of the samples against their prompts (text runs) "
        "or 'a photo of a CLASS' (class runs)",
    )
    add_device_arguments(ev)  # --dtype: sampling's compute dtype; bits/dim always uses the fp32 weights
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    fd = sub.add_parser(
        "fid",
        help="FID and KID between two image folders (uint8, TF1 resize, your Inception weights)",
        description="FID and KID between two folders of images by the conventions published numbers use: "
        "uint8 images, TensorFlow 1 bilinear resize to 299 (or torchmetrics' antialiased one), the FID "
        "Inception-v3 weights file you have (pt_inception-2015-12-05-6726825d.pth), KID with the cubic "
        "polynomial kernel over 100 subsets of 1000.",
    )
    fd.add_argument("dir_a", help="folder of images (e.g. the real ones)")
    fd.add_argument("dir_b", help="folder of images (e.g. generated ones)")
    fd.add_argument("--inception-weights", required=True, metavar="PATH", help="Inception-v3 FID weights file")
    fd.add_argument("--resize", choices=("tf1", "antialias"), default="tf1", help="resize to 299 (default tf1)")
    fd.add_argument("--kid-subsets", type=POS_INT, default=100, help="KID subsets (default 100)")
    fd.add_argument("--kid-subset-size", type=POS_INT, default=1000, help="KID subset size (default 1000)")
    fd.add_argument("--batch-size", type=POS_INT, default=64)
    fd.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: CUDA when present, else CPU (default auto)"
    )
    fd.add_argument("--out", help="also write the numbers to this JSON file")
    fd.add_argument("--no-progress", action="store_true")
    fd.set_defaults(func=_cmd_fid)

    d = sub.add_parser(
        "demo",
        help="the main job: a tour of the reading list on the zoo models -> report.html",
        description="Samplers, classifier-free guidance, text-to-image, editing (RePaint, SDEdit, "
        "DiffEdit, Prompt-to-Prompt) on the zoo models, and a from-scratch training run; "
        "every number next to real images' (about 6 minutes on 2 cores).",
    )
    d.add_argument("--out", default="demo_out", help="folder for report.html, summary.json and the figures")
    d.add_argument(
        "--prompt",
        action="append",
        help='a text-to-image prompt for the shapes model, e.g. "a small blue star on the right" (repeat for several)',
    )
    d.add_argument(
        "--data",
        choices=("fashion_mnist", "digits"),
        help="data of the image sections (default fashion_mnist; digits if it is not installed)",
    )
    d.add_argument("--train-steps", type=POS_INT, help="optimizer steps of the from-scratch run (default 250)")
    d.add_argument("--n-eval", type=POS_INT, help="samples scored per sampler (default 300)")
    d.add_argument("--steps", type=POS_INT, help="sampler steps (default 10)")
    d.add_argument("--quick", action="store_true", help="tiny budgets: a plumbing run in about a minute")
    d.add_argument("--seed", type=SEED, default=0)
    d.set_defaults(func=_cmd_demo)

    dt = sub.add_parser("demo-toy", help="sampler demo on a 2-D Gaussian mixture (writes a PNG)")
    dt.add_argument("--out", default="toy_samplers.png")
    dt.add_argument("--seed", type=SEED, default=0)
    dt.set_defaults(func=_cmd_demo_toy)

    from difflab.train.components import add_commands as add_component_commands

    add_component_commands(sub)  # train-autoencoder, train-classifier

    from difflab.train.clip import add_command as add_clip_command

    add_clip_command(sub)  # train-clip

    from difflab.edit import add_edit_parser

    add_edit_parser(sub)

    from difflab.reproduce import add_reproduce_parser

    add_reproduce_parser(sub)

    from difflab.finetune import add_finetune_parser

    add_finetune_parser(sub)

    e = sub.add_parser(
        "export",
        help="write a run as a diffusers folder (UNet2DModel, scheduler, pipeline.py, model card)",
        description="Write a difflab run (a folder or a zoo name) as a folder that "
        "diffusers.DiffusionPipeline.from_pretrained loads and samples from, with the same outputs as difflab's "
        "sampler on the same noise and grid. Pixel UNet runs map (unconditional or class-conditional, EDM or "
        "discrete-VP eps/v/x0); text-conditional, latent and DiT runs do not, and the error says why.",
    )
    e.add_argument("run", help="run folder or zoo model name")
    e.add_argument("--to", choices=["diffusers"], default="diffusers", help="the format (diffusers)")
    e.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights of a run folder")
    e.add_argument("out", help="new folder to write")
    e.set_defaults(func=_cmd_export)

    from difflab.ui import add_ui_parser

    add_ui_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, FloatingPointError) as e:  # OSError: missing files, full disk, read-only folder
        print(f"difflab {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
