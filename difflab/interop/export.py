"""A difflab run as a diffusers folder: `difflab export RUN --to diffusers OUT`.

    export_diffusers(Pipeline.from_pretrained("runs/fmnist-unet-s"), "out/fmnist")   # or difflab export
    pipe = diffusers.DiffusionPipeline.from_pretrained("out/fmnist", trust_remote_code=True)  # pipeline.py
    images = pipe(batch_size=4, class_labels=[0, 1, 2, 3], guidance_scale=2.0, num_inference_steps=20).images

What maps, and how:

| difflab                                   | the exported folder                                      |
|-------------------------------------------|----------------------------------------------------------|
| UNet (ADM layout, no cross-attention)     | unet/: diffusers UNet2DModel, weights renamed one to one |
|   resblock_updown, scale-shift norm       |   Resnet{Down,Up}sampleBlock2D / Attn*Block2D with       |
|                                           |   down/upsample_type "resnet", resnet_time_scale_shift   |
|   label table with its null row           |   class_embedding of num_classes + 1 rows (the last:     |
|                                           |   the unconditional class of classifier-free guidance)   |
| EDM preconditioning ("edm")               | scheduler/: EDMEulerScheduler (c_in, c_noise = ln(sigma)/4, |
|                                           |   c_skip, c_out are the scheduler's own preconditioning) |
| eps / v / x0 on a DiscreteVP schedule     | scheduler/: EulerDiscreteScheduler, the run's betas      |
| the sampling loop                         | pipeline.py: `DifflabExportPipeline` (model_index.json   |
|                                           |   names it; diffusers loads it from the folder)          |
| run config, zoo record                    | README.md (model card), difflab_config.json              |

What does not map, and why (a one-line error names it):
- text-conditional runs: difflab's cross-attention block (GroupNorm self-attention, then
  LayerNorm cross-attention, no projections or feed-forward) is not diffusers' Transformer2DModel
  block, and the word-level / MiniLM text encoders are not the CLIP a UNet2DConditionModel
  pipeline expects;
- DiT runs: diffusers' DiTTransformer2DModel embeds the timestep with frequencies
  10000^(-i/(half-1)) (downscale_freq_shift=1) where DiT and difflab use 10000^(-i/half); no
  weight renaming makes the two equal;
- Fourier time embeddings, x_cond (extra input channels), a learned variance, VE/VP-continuous
  schedules without EDM preconditioning, and group-norm widths that differ between levels (diffusers
  uses one group count).

The pipeline file is generated here (difflab's code, MIT): it draws unit noise, scales it to the
scheduler's first sigma (EDM) or init_noise_sigma, and walks scheduler.timesteps with optional
classifier-free guidance; for the same noise its output equals difflab's sampler on the same grid
(`tests/interop/test_export.py`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from difflab.core.schedules import DiscreteVP
from difflab.card import model_card
from difflab.nn.layers import norm_groups
from difflab.nn.unet import Downsample, ResBlock, SpatialAttention, UNet, Upsample

__all__ = ["export_diffusers", "unet2d_config", "unet2d_state_dict", "why_not_exportable"]

PIPELINE_MODULE = "pipeline"
PIPELINE_CLASS = "DifflabExportPipeline"


def why_not_exportable(denoiser, config: dict) -> str | None:
    """None if the run maps to a diffusers folder, else the reason it does not."""
    net = denoiser.net
    if config.get("diffusers"):
        return "this pipeline was loaded from a diffusers folder already"
    if config.get("text_encoder"):
        return (
            "text-conditional runs do not map: difflab's cross-attention block (GroupNorm self-attention, then "
            "LayerNorm cross-attention) is not diffusers' Transformer2DModel block, and its text encoder is not CLIP"
        )
    if config.get("autoencoder"):
        return "latent runs do not map: difflab's autoencoder is not diffusers' AutoencoderKL"
    if not isinstance(net, UNet):
        arch = config.get("model", {}).get("arch", type(net).__name__)
        if arch == "dit":
            return (
                "DiT runs do not map: diffusers' DiTTransformer2DModel embeds the timestep with frequencies "
                "10000^(-i/(half-1)), DiT and difflab with 10000^(-i/half)"
            )
        return f"only UNet runs map to diffusers, this run's network is {arch!r}"
    cfg = net.config
    if cfg.time_embedding != "positional" or cfg.time_scale != 1.0:
        return f"the {cfg.time_embedding} time embedding (time_scale {cfg.time_scale}) has no diffusers equivalent"
    if cfg.extra_in_channels:
        return "runs with x_cond (extra input channels) do not map to a diffusers pipeline"
    if cfg.learn_sigma or denoiser.learned_variance:
        return "learned-variance runs do not map (diffusers' EDM and Euler schedulers ignore the variance half)"
    widths = sorted({cfg.channels * m for m in cfg.channel_mult})
    if len({norm_groups(w) for w in widths}) != 1:
        return f"GroupNorm group counts differ between levels {widths}; diffusers' UNet2DModel uses one count"
    heads = _head_dim(cfg)
    if heads is None:
        return "attention heads of different widths per level do not map to diffusers' one attention_head_dim"
    if denoiser.prediction == "edm":
        return None
    if not isinstance(denoiser.schedule, DiscreteVP):
        return (
            f"prediction {denoiser.prediction!r} on a {type(denoiser.schedule).__name__} schedule has no diffusers "
            "scheduler (exported: EDM preconditioning on any schedule, or eps/v/x0 on a discrete VP schedule)"
        )
    return None


def _attention_widths(cfg) -> list[int]:
    widths, side = [], cfg.image_size
    for mult in cfg.channel_mult:
        if side in cfg.attention_resolutions:
            widths.append(cfg.channels * mult)
        side //= 2
    if cfg.mid_attention:
        widths.append(cfg.channels * cfg.channel_mult[-1])
    return widths


def _head_dim(cfg) -> int | None:
    """The one attention head width of the UNet (diffusers' attention_head_dim), or None if it varies."""
    dims = {w // cfg.heads_for(w) for w in _attention_widths(cfg)}
    if not dims:
        return cfg.head_channels or cfg.channels
    return dims.pop() if len(dims) == 1 else None


def unet2d_config(net: UNet) -> dict:
    """The diffusers UNet2DModel config of a difflab UNet (same layers, same order)."""
    cfg = net.config
    down, up, side = [], [], cfg.image_size
    resnet = cfg.resblock_updown
    for mult in cfg.channel_mult:
        attn = side in cfg.attention_resolutions
        down.append("AttnDownBlock2D" if attn else ("ResnetDownsampleBlock2D" if resnet else "DownBlock2D"))
        up.append("AttnUpBlock2D" if attn else ("ResnetUpsampleBlock2D" if resnet else "UpBlock2D"))
        side //= 2
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": down,
        "up_block_types": list(reversed(up)),
        "block_out_channels": [cfg.channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if resnet else "conv",
        "upsample_type": "resnet" if resnet else "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": _head_dim(cfg),
        "norm_num_groups": norm_groups(cfg.channels),
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "add_attention": cfg.mid_attention,
        "attn_norm_num_groups": norm_groups(cfg.channels * cfg.channel_mult[-1]),  # else none with scale_shift
        "class_embed_type": None,
        "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1,
    }


def _resblock(prefix: str, block: ResBlock, src: str, out: dict, state: dict) -> None:
    names = {"norm_in": "norm1", "conv_in": "conv1", "emb_proj": "time_emb_proj", "norm_out": "norm2"}
    names.update({"conv_out": "conv2", "skip": "conv_shortcut"})
    for ours, theirs in names.items():
        for key in ("weight", "bias"):
            k = f"{src}.{ours}.{key}"
            if k in state:
                out[f"{prefix}.{theirs}.{key}"] = state[k]


def _attention(prefix: str, src: str, out: dict, state: dict) -> None:
    for ours, theirs in (("norm", "group_norm"), ("self_attn.to_q", "to_q"), ("self_attn.to_k", "to_k")):
        for key in ("weight", "bias"):
            out[f"{prefix}.{theirs}.{key}"] = state[f"{src}.{ours}.{key}"]
    for ours, theirs in (("self_attn.to_v", "to_v"), ("self_attn.to_out", "to_out.0")):
        for key in ("weight", "bias"):
            out[f"{prefix}.{theirs}.{key}"] = state[f"{src}.{ours}.{key}"]


def _stage(prefix: str, index: int, stage, src: str, out: dict, state: dict, last: bool) -> None:
    """One difflab Stage (resblock, optional attention, optional resampler) into a diffusers block."""
    for j, layer in enumerate(stage):
        name = f"{src}.{j}"
        if isinstance(layer, ResBlock) and layer.resample is None:
            _resblock(f"{prefix}.resnets.{index}", layer, name, out, state)
        elif isinstance(layer, SpatialAttention):
            _attention(f"{prefix}.attentions.{index}", name, out, state)
        elif isinstance(layer, ResBlock):  # the resampling resblock of a level
            _resblock(
                f"{prefix}.{'downsamplers' if layer.resample == 'down' else 'upsamplers'}.0", layer, name, out, state
            )
        elif isinstance(layer, (Downsample, Upsample)):
            kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
            for key in ("weight", "bias"):
                out[f"{prefix}.{kind}.0.conv.{key}"] = state[f"{name}.conv.{key}"]
        else:
            raise TypeError(f"unexpected layer {type(layer).__name__} in {name}")


def unet2d_state_dict(net: UNet) -> dict:
    """difflab UNet weights under diffusers UNet2DModel names (tensors shared, not copied)."""
    cfg, state = net.config, net.state_dict()
    out = {
        "time_embedding.linear_1.weight": state["time_embed.mlp.0.weight"],
        "time_embedding.linear_1.bias": state["time_embed.mlp.0.bias"],
        "time_embedding.linear_2.weight": state["time_embed.mlp.2.weight"],
        "time_embedding.linear_2.bias": state["time_embed.mlp.2.bias"],
        "conv_in.weight": state["conv_in.weight"],
        "conv_in.bias": state["conv_in.bias"],
        "conv_norm_out.weight": state["norm_out.weight"],
        "conv_norm_out.bias": state["norm_out.bias"],
        "conv_out.weight": state["conv_out.weight"],
        "conv_out.bias": state["conv_out.bias"],
    }
    if net.label_embed is not None:
        out["class_embedding.weight"] = state["label_embed.embedding_table.weight"]
    levels = len(cfg.channel_mult)
    i = 0
    for level in range(levels):
        for r in range(cfg.num_res_blocks):
            _stage(f"down_blocks.{level}", r, net.down[i], f"down.{i}", out, state, False)
            i += 1
        if level != levels - 1:
            _stage(f"down_blocks.{level}", 0, net.down[i], f"down.{i}", out, state, True)
            i += 1
    mid = [layer for layer in net.mid]
    _resblock("mid_block.resnets.0", mid[0], "mid.0", out, state)
    if cfg.mid_attention:
        _attention("mid_block.attentions.0", "mid.1", out, state)
    _resblock("mid_block.resnets.1", mid[-1], f"mid.{len(mid) - 1}", out, state)
    i = 0
    for block in range(levels):
        for r in range(cfg.num_res_blocks + 1):
            _stage(f"up_blocks.{block}", r, net.up[i], f"up.{i}", out, state, r == cfg.num_res_blocks)
            i += 1
    return out


def _scheduler(denoiser) -> tuple[str, dict]:
    schedule = denoiser.schedule
    if denoiser.prediction == "edm":
        sigma_data = float(getattr(denoiser, "sigma_data", 0.5))
        return "EDMEulerScheduler", {
            "sigma_min": float(schedule.sigma_min),
            "sigma_max": float(schedule.sigma_max),
            "sigma_data": sigma_data,
            "rho": float(getattr(schedule, "rho", 7.0)),
            "sigma_schedule": "karras",
            "prediction_type": "epsilon",
            "final_sigmas_type": "zero",
        }
    alphas = 1 / (1 + schedule.sigmas.double() ** 2)  # alpha-bar_t
    prev = torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    betas = (1 - alphas / prev).tolist()
    kind = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[denoiser.prediction]
    # Euler on the schedule's own sigmas (trailing: the first step at t = T - 1, the last to sigma 0):
    # the same method as difflab's euler on that grid. DDIMScheduler would step from t to t - T // N,
    # which is not the next timestep of its trailing grid (999 -> 833, then 832 -> ...).
    return "EulerDiscreteScheduler", {
        "num_train_timesteps": len(betas),
        "trained_betas": betas,
        "prediction_type": kind,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
        "interpolation_type": "linear",
        "final_sigmas_type": "zero",
    }


_PIPELINE = '''"""A diffusers pipeline for a UNet2DModel exported by difflab (`difflab export`).

Draws unit Gaussian noise (or takes `latents`), scales it to the scheduler's first sigma (EDM
schedulers) or its init_noise_sigma, and walks scheduler.timesteps with classifier-free guidance
on the class embedding's last row (the null class). Written by difflab; MIT licence.
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DifflabExportPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size=1,
        class_labels=None,
        guidance_scale=1.0,
        num_inference_steps=20,
        generator=None,
        latents=None,
        output_type="pil",
        return_dict=True,
    ):
        unet, scheduler = self.unet, self.scheduler
        size = unet.config.sample_size
        shape = (batch_size, unet.config.in_channels, size, size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        scheduler.set_timesteps(num_inference_steps, device=device)
        edm = type(scheduler).__name__.startswith("EDM")
        x = latents.to(device, torch.float32) * (scheduler.sigmas[0] if edm else scheduler.init_noise_sigma)
        classes = unet.config.num_class_embeds
        labels = None
        if classes:
            if class_labels is None:
                class_labels = [i % (classes - 1) for i in range(batch_size)]
            labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch_size)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this model is unconditional")
        guided = guidance_scale != 1.0
        if guided and labels is None:
            raise ValueError("guidance needs a class-conditional model")
        for t in self.progress_bar(scheduler.timesteps):
            model_in = scheduler.scale_model_input(x, t).to(unet.dtype)
            if guided:
                both = torch.cat([labels, torch.full_like(labels, classes - 1)])
                cond, uncond = unet(torch.cat([model_in] * 2), t, class_labels=both).sample.float().chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = unet(model_in, t, class_labels=labels).sample.float()
            x = scheduler.step(out, t, x).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
'''


def export_diffusers(pipe, out, zoo: dict | None = None) -> Path:
    """Write a loaded difflab Pipeline (`Pipeline.from_pretrained(run)`) as a diffusers folder at
    `out`; `zoo`: the run's zoo.json record, for the model card.

    The folder is written next to `out` and renamed into place, so a failed export leaves nothing
    half-written; an existing non-empty `out` is refused. Raises ValueError naming why a run does
    not map (`why_not_exportable`)."""
    try:
        import diffusers
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ValueError(f"exporting to diffusers needs diffusers installed: {e}") from None
    why = why_not_exportable(pipe.denoiser, pipe.config)
    if why:
        raise ValueError(f"cannot export to diffusers: {why}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; give a new folder")
    net = pipe.denoiser.net
    unet = UNet2DModel(**unet2d_config(net))
    missing, unexpected = unet.load_state_dict(unet2d_state_dict(net), strict=False)
    if missing or unexpected:  # every weight must land: a name off by one would be a silent bug
        raise RuntimeError(f"diffusers UNet2DModel mapping is incomplete: missing {missing}, unexpected {unexpected}")
    scheduler_cls, scheduler_config = _scheduler(pipe.denoiser)
    scheduler = getattr(diffusers, scheduler_cls)(**scheduler_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": [PIPELINE_MODULE, PIPELINE_CLASS],
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", scheduler_cls],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / f"{PIPELINE_MODULE}.py").write_text(_PIPELINE)
        config = {k: v for k, v in pipe.config.items() if k != "saved_step"}
        (tmp / "difflab_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        card = model_card(config, zoo, name=out.name, exported=f"diffusers ({scheduler_cls}, UNet2DModel)")
        (tmp / "README.md").write_text(card)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
