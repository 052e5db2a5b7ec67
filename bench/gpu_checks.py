"""GPU checks: the same code on CUDA gives the CPU's answers, and trains.

    python bench/gpu_checks.py --out bench/results       # on a machine with a GPU

1. Every sampler on a randomly initialised UNet and DiT, same starting noise and the same CPU
   generator for the injected noise: max |x_cuda - x_cpu| (TF32 off, fp32).
2. Training on CUDA: fp32 and bf16 autocast, 30 steps each on digits; finite loss that falls;
   exact resume (10 + 10 steps against 20 in one go, with deterministic algorithms).
3. torchrun with NCCL, one process on the GPU: a short run completes and writes its folder.
4. A diffusers Stable Diffusion layout folder (tiny, random, built as the tests build it) and a DiT
   folder: sampled on CUDA in fp32, fp16 and bf16 (and fp16 with --low-memory's switches) from the
   same latents as on the CPU in fp32; mean and max |difference| within the dtype's tolerance.
Writes gpu_checks.json and prints a table; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sampler_equivalence(device: str) -> list[dict]:
    from difflab.core import Preconditioned
    from difflab.core.sampling import SAMPLERS, sample
    from difflab.core.schedules import EDM, sigmas_karras
    from difflab.nn import create_model

    rows = []
    for name, kw in (("unet-xs", dict(channels=16)), ("DiT-T/2", {})):
        torch.manual_seed(0)
        net = create_model(name, image_size=16, in_channels=1, num_classes=10, **kw)
        with torch.no_grad():  # zero-initialised output layers would make every sampler trivially equal
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        D = Preconditioned(net, EDM(), "edm").eval()
        sig = sigmas_karras(8, 0.002, 80.0)
        x0 = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 80.0
        labels = torch.arange(4)
        for sampler in SAMPLERS:
            outs = []
            for dev in ("cpu", device):
                D.to(dev)
                with torch.no_grad():
                    outs.append(
                        sample(
                            D,
                            x0.to(dev),
                            sig,
                            method=sampler,
                            cond={"class_labels": labels.to(dev)},
                            noise=torch.Generator().manual_seed(2),
                        ).cpu()
                    )
            diff = (outs[0] - outs[1]).abs().max().item()
            scale = outs[0].abs().max().item()
            rows.append(
                {
                    "net": name,
                    "sampler": sampler,
                    "max_abs_diff": diff,
                    "max_abs": scale,
                    "ok": diff <= 1e-3 * max(1.0, scale),
                }
            )
    return rows


def training(device: str) -> list[dict]:
    from difflab.train import TrainConfig, train
    from safetensors.torch import load_file

    rows = []
    base = dict(
        data="digits",
        model="unet-xs",
        model_overrides={"channels": 16},
        batch_size=32,
        lr=2e-3,
        warmup=2,
        save_every=0,
        log_every=5,
        ema_decay=0.9,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (False, True):
            out = Path(tmp) / f"bf16_{bf16}"
            t0 = time.perf_counter()
            train(TrainConfig(steps=30, bf16=bf16, **base), out, progress=False, device=device)
            log = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in log]
            ok = all(map(lambda v: v == v and abs(v) < 1e6, losses)) and losses[-1] < losses[0]
            rows.append(
                {
                    "check": f"train 30 steps, bf16={bf16}",
                    "first_loss": losses[0],
                    "last_loss": losses[-1],
                    "seconds": time.perf_counter() - t0,
                    "ok": ok,
                }
            )
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        whole, split = Path(tmp) / "whole", Path(tmp) / "split"
        train(TrainConfig(steps=20, **base), whole, progress=False, device=device)
        train(TrainConfig(steps=20, **{**base, "save_every": 10}), split, progress=False, device=device, stop_after=10)
        train(TrainConfig(steps=20, **{**base, "save_every": 10}), split, resume=True, progress=False, device=device)
        a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        rows.append(
            {"check": "resume 10 + 10 == 20 steps (deterministic algorithms)", "max_abs_diff": diff, "ok": diff <= 1e-5}
        )
        torch.use_deterministic_algorithms(False)
    return rows


def torchrun_nccl() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "difflab",
            "train",
            "--data",
            "digits",
            "--model",
            "unet-xs",
            "--steps",
            "10",
            "--batch-size",
            "32",
            "--out",
            str(Path(tmp) / "ddp"),
            "--no-progress",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        ok = p.returncode == 0 and (Path(tmp) / "ddp" / "model.safetensors").exists()
        return [
            {
                "check": "torchrun --nproc_per_node=1 (NCCL) difflab train",
                "returncode": p.returncode,
                "seconds": time.perf_counter() - t0,
                "ok": ok,
                "stderr_tail": p.stderr[-600:] if not ok else "",
            }
        ]


# mean |x_dtype - x_cpu_fp32| allowed per compute dtype (images in [-1, 1]; 4 steps of a random folder)
DTYPE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


def diffusers_folders(device: str) -> list[dict]:
    from difflab.pipeline import Pipeline
    from tests.interop.test_diffusers_dit import tiny_dit_folder
    from tests.interop.test_diffusers_folder import tiny_sd_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"sd": tiny_sd_folder(Path(tmp) / "sd"), "dit": tiny_dit_folder(Path(tmp) / "dit")}
        for kind, folder in folders.items():
            if kind == "sd":
                kw = dict(prompt=["a cat", "a red dog"], guidance_scale=3.0)
                shape = (2, 4, 8, 8)
            else:
                kw = dict(class_labels=[1, 2], guidance_scale=4.0)
                shape = (2, 4, 8, 8)
            latents = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            ref = Pipeline.from_pretrained(folder)(2, steps=4, sampler="dpmpp_2m", latents=latents, **kw)
            for dtype, low in (("fp32", False), ("fp16", False), ("bf16", False), ("fp16", True)):
                pipe = Pipeline.from_pretrained(folder).to(device, dtype)
                if low:
                    pipe.enable_low_memory(attention_slice=16)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                x = pipe(2, steps=4, sampler="dpmpp_2m", latents=latents, **kw)
                diff = (x - ref).abs()
                rows.append(
                    {
                        "check": f"{kind} folder {dtype}" + (" low-memory" if low else ""),
                        "mean_abs_diff": float(diff.mean()),
                        "max_abs_diff": float(diff.max()),
                        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
                        "ok": bool(torch.isfinite(x).all() and diff.mean() < DTYPE_TOLERANCE[dtype]),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--skip-torchrun", action="store_true")
    p.add_argument("--only-folders", action="store_true", help="only check 4 (the diffusers folders)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    result = {
        "device": dev_name,
        "torch": torch.__version__,
        "samplers": [] if args.only_folders else sampler_equivalence(args.device),
        "training": [] if args.only_folders else training(args.device),
        "torchrun": [] if args.skip_torchrun or args.only_folders else torchrun_nccl(),
        "diffusers_folders": diffusers_folders(args.device),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_checks.json").write_text(json.dumps(result, indent=1))
    bad = 0
    print(f"device {dev_name}, torch {torch.__version__}")
    for r in result["samplers"]:
        bad += not r["ok"]
        print(
            f"  {r['net']:8s} {r['sampler']:16s} max|cuda - cpu| {r['max_abs_diff']:.2e} (scale {r['max_abs']:.2f}) "
            f"{'ok' if r['ok'] else 'FAIL'}"
        )
    for r in result["training"] + result["torchrun"] + result["diffusers_folders"]:
        bad += not r["ok"]
        print(
            f"  {r['check']}: {'ok' if r['ok'] else 'FAIL'} "
            f"{ {k: v for k, v in r.items() if k not in ('check', 'ok')} }"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
