"""Training throughput: difflab's UNet against diffusers' UNet2DModel of matched FLOPs, side by side.

One training step = forward, MSE loss, backward, AdamW step, at batch 64, for each image size
(16x16, 32x32) in fp32 and under bf16 autocast. Our UNet ("unet-s": channels 32, mult (1, 2, 2),
2 blocks a level, attention at 1/4 side, heads of 32 channels, scale-shift norm, BigGAN-style
resampling) faces a UNet2DModel built to the same blueprint (scale_shift time conditioning,
resnet down/up sampling, AttnDown/AttnUp at the same level, head dim 32), and the script checks
that their FLOPs per image agree within 10%. Measurements alternate ours, theirs, ours, theirs...
in one process (the machine may be shared), and the table reports medians and the median of the
per-pair ratios. The machine's matmul peak (fp32 and bf16, a large torch.matmul) is measured in
the same run, so each model's FLOP rate is also given as a fraction of it.

    .venv/bin/python bench/train_throughput.py                  # writes bench/results/train_throughput.{md,json}
    .venv/bin/python bench/train_throughput.py --sizes 16 --reps 3 --out /tmp/tt   # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from difflab.core.attention import attention_hooks
from difflab.nn import create_model, model_config
from difflab.nn.base import _ExplicitAttention

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# The two networks
# --------------------------------------------------------------------------------------------


def ours(name: str, size: int, channels_in: int) -> torch.nn.Module:
    return create_model(name, image_size=size, in_channels=channels_in)


def diffusers_twin(name: str, size: int, channels_in: int, **extra) -> torch.nn.Module:
    """UNet2DModel built to the blueprint of our registry model `name` (same widths, blocks, attention);
    `extra` goes to UNet2DModel (e.g. num_class_embeds)."""
    from diffusers import UNet2DModel

    cfg = model_config(name, image_size=size, in_channels=channels_in)
    levels = len(cfg.channel_mult)
    sides = [size // 2**i for i in range(levels)]
    attn = [s in cfg.attention_resolutions for s in sides]
    if cfg.head_channels is None:
        raise ValueError("the twin needs head_channels (diffusers' attention_head_dim)")
    # BigGAN-style resampling: the attention blocks take downsample_type/upsample_type="resnet",
    # the plain ones are the Resnet{Down,Up}sampleBlock2D types (DownBlock2D ignores the flag).
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if cfg.resblock_updown else ("DownBlock2D", "UpBlock2D")
    )
    return UNet2DModel(
        sample_size=size,
        in_channels=channels_in,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)),
        downsample_type="resnet" if cfg.resblock_updown else "conv",
        upsample_type="resnet" if cfg.resblock_updown else "conv",
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        attention_head_dim=cfg.head_channels,
        add_attention=cfg.mid_attention,
        norm_num_groups=min(32, cfg.channels),
        time_embedding_type="positional",
        **extra,
    )


def _theirs_forward(net, x, t):
    return net(x, t).sample


def _ours_forward(net, x, t):
    return net(x, t)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def train_flops(net: torch.nn.Module, forward, size: int, channels_in: int, explicit_attention) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) for one image, counted by torch."""
    x = torch.randn(2, channels_in, size, size)  # 2: per-image count of a batch, halved
    t = torch.rand(2) * 999
    with explicit_attention():
        with FlopCounterMode(display=False) as fwd:
            out = forward(net, x, t)
        with FlopCounterMode(display=False) as bwd:
            out.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    f, b = fwd.get_total_flops() // 2, bwd.get_total_flops() // 2
    return f, f + b


def _ours_explicit(net):
    return lambda: attention_hooks(net, _ExplicitAttention())


def _theirs_explicit(net):
    import contextlib

    from diffusers.models.attention_processor import Attention, AttnProcessor

    layers = [m for m in net.modules() if isinstance(m, Attention)]

    @contextlib.contextmanager
    def ctx():
        fused = [m.processor for m in layers]
        for m in layers:
            m.set_processor(AttnProcessor())  # baddbmm + softmax: FlopCounterMode sees it
        try:
            yield
        finally:
            for m, proc in zip(layers, fused):
                m.set_processor(proc)

    return ctx


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _best_rate(fn, flops: float, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def machine_peaks(dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """Best FLOP/s in `dtype` of a 2048^3 torch.matmul and of a large dense 3x3 convolution.

    On x86 torch's matmul is MKL's gemm and its convolution is oneDNN's; on an AMD CPU MKL may
    not take its AVX-512 path, so the convolution can be the faster of the two.
    """
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x, w = torch.randn(64, 256, 16, 16).to(dtype), torch.randn(256, 256, 3, 3).to(dtype)
    return {
        "matmul": _best_rate(lambda: torch.matmul(a, b), 2 * n**3, reps),
        "conv3x3": _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 64 * 256 * 256 * 9 * 16 * 16, reps),
    }


class Trainer:
    """One model's training step on a fixed batch: forward, MSE, backward, AdamW."""

    def __init__(self, net, forward, batch: int, size: int, channels_in: int, bf16: bool, channels_last: bool = False):
        g = torch.Generator().manual_seed(0)
        self.net = net.train()
        self.forward = forward
        self.bf16 = bf16
        self.opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        self.x = torch.randn(batch, channels_in, size, size, generator=g)
        self.target = torch.randn(batch, channels_in, size, size, generator=g)
        self.t = torch.rand(batch, generator=g) * 999
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
            self.target = self.target.contiguous(memory_format=torch.channels_last)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(self.net, self.x, self.t)
        loss = F.mse_loss(out.float(), self.target)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def bench_pair(a: Trainer, b: Trainer, warmup: int, reps: int, steps: int) -> tuple[list[float], list[float]]:
    """Alternate a, b, a, b...: per repetition, seconds per step of each (mean over `steps` steps)."""
    for _ in range(warmup):
        a.step()
        b.step()
    ta, tb = [], []
    for r in range(reps):
        order = (a, b) if r % 2 == 0 else (b, a)  # neither always runs first
        times = {}
        for trainer in order:
            times[id(trainer)] = sum(trainer.step() for _ in range(steps)) / steps
        ta.append(times[id(a)])
        tb.append(times[id(b)])
    return ta, tb


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="unet-s", help="our registry model (default unet-s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (pairs) per row")
    p.add_argument("--steps", type=int, default=1, help="training steps per timed repetition")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="feed both models NHWC batches")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile our UNet (not the default: ~5 min of compiling per shape on 2 cores)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "train_throughput", help="output path stem (.md, .json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    command = "python bench/train_throughput.py" + (
        "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    )

    peaks: dict[str, dict[str, list[float]]] = {"fp32": {}, "bf16": {}}

    def measure_peaks():  # before and after each size: the best of all counts
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for kernel, rate in machine_peaks(dt).items():
                peaks[name].setdefault(kernel, []).append(rate)

    measure_peaks()
    rows = []
    compile_s: dict[str, float] = {}
    for size in args.sizes:
        torch.manual_seed(0)
        nets = {
            "ours": ours(args.model, size, args.channels),
            "diffusers": diffusers_twin(args.model, size, args.channels),
        }
        flops = {
            "ours": train_flops(nets["ours"], _ours_forward, size, args.channels, _ours_explicit(nets["ours"])),
            "diffusers": train_flops(
                nets["diffusers"], _theirs_forward, size, args.channels, _theirs_explicit(nets["diffusers"])
            ),
        }
        params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
        mismatch = flops["diffusers"][0] / flops["ours"][0] - 1
        print(
            f"{size}x{size}: forward GFLOPs/img ours {flops['ours'][0] / 1e9:.4f}, diffusers "
            f"{flops['diffusers'][0] / 1e9:.4f} ({mismatch:+.1%}); params ours {params['ours']:,}, "
            f"diffusers {params['diffusers']:,}",
            flush=True,
        )
        if abs(mismatch) > 0.10:
            print(f"warning: FLOPs differ by {mismatch:+.1%} (> 10%)", file=sys.stderr)
        for dtype in args.dtypes:
            bf16 = dtype == "bf16"
            a = Trainer(nets["ours"], _ours_forward, args.batch, size, args.channels, bf16, args.channels_last)
            if args.compile:
                a.net = torch.compile(nets["ours"])
                t0 = time.perf_counter()
                a.step()
                compile_s[f"{size}-{dtype}"] = time.perf_counter() - t0
                print(f"  {dtype}: compiled in {compile_s[f'{size}-{dtype}']:.0f} s", flush=True)
            b = Trainer(nets["diffusers"], _theirs_forward, args.batch, size, args.channels, bf16, args.channels_last)
            ta, tb = bench_pair(a, b, args.warmup, args.reps, args.steps)
            ratios = [y / x for x, y in zip(ta, tb)]
            row = {
                "size": size,
                "dtype": dtype,
                "batch": args.batch,
                "fwd_flops_per_img": {k: v[0] for k, v in flops.items()},
                "train_flops_per_img": {k: v[1] for k, v in flops.items()},
                "params": params,
                "sec_per_step": {"ours": ta, "diffusers": tb},
                "img_per_s": {
                    "ours": args.batch / statistics.median(ta),
                    "diffusers": args.batch / statistics.median(tb),
                },
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
            rows.append(row)
            print(
                f"  {dtype}: img/s ours {row['img_per_s']['ours']:.1f}, diffusers {row['img_per_s']['diffusers']:.1f}, "
                f"ratio {row['ratio_median']:.2f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]",
                flush=True,
            )
        measure_peaks()
    peak_by_kernel = {d: {k: max(v) for k, v in kernels.items()} for d, kernels in peaks.items()}
    peak = {d: max(kernels.values()) for d, kernels in peak_by_kernel.items()}
    for row in rows:
        row["pct_of_peak"] = {
            k: 100 * row["img_per_s"][k] * row["train_flops_per_img"][k] / peak[row["dtype"]]
            for k in ("ours", "diffusers")
        }

    meta = {
        "command": command,
        "torch": torch.__version__,
        "threads": threads,
        "processor": _cpu_name(),
        "machine": platform.machine(),
        "peak_flops": peak,
        "peak_flops_by_kernel": peak_by_kernel,
        "channels_last": args.channels_last,
        "compile_seconds": compile_s or None,
    }
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(meta, rows, args))
    print(render(meta, rows, args))
    return 0


def render(meta: dict, rows: list[dict], args) -> str:
    lines = [
        "# Training throughput: difflab UNet vs diffusers UNet2DModel (matched FLOPs)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"torch {meta['torch']}, diffusers {meta.get('diffusers', '?')}, {meta['threads']} thread(s), "
        f"{meta['processor']}. Machine peak, best of the run: "
        + "; ".join(
            f"{d} {meta['peak_flops'][d] / 1e9:.0f} GFLOP/s (2048^3 torch.matmul "
            f"{k['matmul'] / 1e9:.0f}, 3x3 conv 256->256 ch {k['conv3x3'] / 1e9:.0f})"
            for d, k in meta["peak_flops_by_kernel"].items()
        )
        + "; % of peak uses the larger of the two.",
        f"A step is forward + MSE + backward + AdamW on a batch of {args.batch}; ours is `{args.model}`"
        + (" under torch.compile" if meta["compile_seconds"] else "")
        + ", theirs "
        "the UNet2DModel of the same blueprint. FLOPs are counted by torch (2 per multiply-add; "
        "train = forward + backward). img/s are medians of "
        f"{args.reps} alternating repetitions after {args.warmup} warm-up steps; the ratio is the median of the "
        "per-repetition ratios (ours/diffusers speed), [min, max] beside it.",
        "",
        "| size | dtype | fwd GFLOPs/img ours / diffusers | train GFLOPs/img | img/s ours | img/s diffusers "
        "| ratio ours/diffusers | % of peak ours | % of peak diffusers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fwd_flops_per_img"]
        tr = r["train_flops_per_img"]
        lines.append(
            f"| {r['size']}x{r['size']} | {r['dtype']} | {f['ours'] / 1e9:.3f} / {f['diffusers'] / 1e9:.3f} "
            f"| {tr['ours'] / 1e9:.3f} / {tr['diffusers'] / 1e9:.3f} "
            f"| {r['img_per_s']['ours']:.1f} | {r['img_per_s']['diffusers']:.1f} "
            f"| **{r['ratio_median']:.2f}x** [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] "
            f"| {r['pct_of_peak']['ours']:.1f}% | {r['pct_of_peak']['diffusers']:.1f}% |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
