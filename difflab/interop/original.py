"""Original checkpoints into difflab's own networks: guided-diffusion (ADM, Dhariwal & Nichol 2021)
UNet state dicts into `difflab.nn.UNet`, and DiT (Peebles & Xie 2023) state dicts into
`difflab.nn.DiT`. Files are read with torch.load(weights_only=True) (tensors only, no code) or as
safetensors; every tensor of the file must land and every weight of the network must be given.

    pipe = Pipeline.from_original("64x64_diffusion.pt", "adm", image_size=64, num_channels=192,
                                  num_res_blocks=3, attention_resolutions="32,16,8", num_head_channels=64,
                                  class_cond=True, learn_sigma=True, resblock_updown=True,
                                  use_new_attention_order=True)
    pipe = Pipeline.from_original("DiT-XL-2-256x256.pt", "dit", vae="sd-vae-ft-ema/")   # an AutoencoderKL folder

The mapping (ADM):

| guided-diffusion                              | difflab UNet                                      |
|-----------------------------------------------|---------------------------------------------------|
| time_embed.0 / .2                             | time_embed.mlp.0 / .2                             |
| label_emb (num_classes rows)                  | label_embed.embedding_table (+ a null row, unused:|
|                                               |   ADM has no classifier-free guidance)            |
| input_blocks.0.0                              | conv_in                                           |
| input_blocks.k / middle_block / output_blocks.k| down[k-1] / mid / up[k], layer by layer          |
| ResBlock in_layers.0/.2, emb_layers.1,        | norm_in, conv_in, emb_proj, norm_out, conv_out,   |
|   out_layers.0/.3, skip_connection            |   skip                                            |
| AttentionBlock norm, qkv (conv1d, 3C), proj_out| norm, self_attn.to_q/k/v (split by the head      |
|                                               |   layout: legacy (heads, 3, ch) or new (3, heads, ch)), to_out |
| Downsample.op / Upsample.conv                 | Downsample.conv / Upsample.conv                   |
| out.0 / out.2                                 | norm_out / conv_out                               |

The noise schedule is ADM's (linear or cosine betas, T steps, eps prediction with the learned
variance half); the network sees the integer-valued timestep t (c_noise = t(sigma)).

DiT: x_embedder.proj -> patch_embed, t_embedder.mlp -> time_embed.mlp, y_embedder.embedding_table
-> label_embed.embedding_table (1000 classes + the null row of classifier-free guidance), blocks.i.attn.qkv ->
attn.to_q/k/v (timm's (3, heads, ch) layout), attn.proj -> attn.to_out, adaLN_modulation.1 -> ada_ln.1,
final_layer likewise; the file's pos_embed is checked against difflab's sin-cos positions. DiT's
schedule: linear betas 1e-4 .. 0.02 over 1000 steps, eps with learned variance.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from difflab.core.denoiser import Preconditioned
from difflab.core.schedules import vp_cosine, vp_linear
from difflab.nn.dit import DIT_SIZES, DiT, DiTConfig
from difflab.nn.unet import UNet, UNetConfig

__all__ = ["read_state_dict", "adm_unet", "load_adm", "dit_network", "load_dit", "ADM_CHANNEL_MULT"]

# guided-diffusion's channel_mult by image size (its create_model defaults)
ADM_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch state dict (weights_only: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from difflab.runfolder import read_safetensors

        return read_safetensors(path)[0]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: not a plain state dict
        raise ValueError(f"{path} is not a plain tensor state dict ({type(e).__name__}: {e})") from None
    for key in ("ema", "model", "state_dict"):  # DiT's training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_exact(net: torch.nn.Module, state: dict, what: str) -> None:
    own = net.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} does not fit: {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]} (check the architecture flags)"
        )
    net.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# ADM
# --------------------------------------------------------------------------------------------


def _split_qkv(w: Tensor, heads: int, order: str) -> tuple[Tensor, Tensor, Tensor]:
    """A (3C, ...) qkv projection as three (C, ...) ones. legacy: rows grouped (heads, [q, k, v], ch);
    new: ([q, k, v], heads, ch)."""
    c3 = w.shape[0]
    ch = c3 // (3 * heads)
    rest = w.shape[1:]
    if order == "legacy":
        w = w.reshape(heads, 3, ch, *rest).transpose(0, 1)  # (3, heads, ch, ...)
    else:
        w = w.reshape(3, heads, ch, *rest)
    q, k, v = (part.reshape(heads * ch, *rest) for part in w)
    return q, k, v


def _adm_to_difflab(state: dict, net: UNet, order: str) -> dict:
    cfg, out = net.config, {}

    def resblock(src: str, dst: str) -> None:
        names = {"in_layers.0": "norm_in", "in_layers.2": "conv_in", "emb_layers.1": "emb_proj"}
        names.update({"out_layers.0": "norm_out", "out_layers.3": "conv_out", "skip_connection": "skip"})
        for a, b in names.items():
            for p in ("weight", "bias"):
                if f"{src}.{a}.{p}" in state:
                    out[f"{dst}.{b}.{p}"] = state[f"{src}.{a}.{p}"]

    def attention(src: str, dst: str, channels: int) -> None:
        heads = cfg.heads_for(channels)
        out[f"{dst}.norm.weight"], out[f"{dst}.norm.bias"] = state[f"{src}.norm.weight"], state[f"{src}.norm.bias"]
        w = _split_qkv(state[f"{src}.qkv.weight"][..., 0], heads, order)  # conv1d (3C, C, 1) -> (3C, C)
        b = _split_qkv(state[f"{src}.qkv.bias"], heads, order)
        for name, wi, bi in zip(("to_q", "to_k", "to_v"), w, b):
            out[f"{dst}.self_attn.{name}.weight"], out[f"{dst}.self_attn.{name}.bias"] = wi, bi
        out[f"{dst}.self_attn.to_out.weight"] = state[f"{src}.proj_out.weight"][..., 0]
        out[f"{dst}.self_attn.to_out.bias"] = state[f"{src}.proj_out.bias"]

    def stage(src: str, dst: str, layers) -> None:
        from difflab.nn.unet import Downsample, ResBlock, SpatialAttention, Upsample

        for j, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                resblock(f"{src}.{j}", f"{dst}.{j}")
            elif isinstance(layer, SpatialAttention):
                attention(f"{src}.{j}", f"{dst}.{j}", layer.norm.num_channels)
            elif isinstance(layer, Downsample):
                out[f"{dst}.{j}.conv.weight"], out[f"{dst}.{j}.conv.bias"] = (
                    state[f"{src}.{j}.op.weight"],
                    state[f"{src}.{j}.op.bias"],
                )
            elif isinstance(layer, Upsample):
                out[f"{dst}.{j}.conv.weight"], out[f"{dst}.{j}.conv.bias"] = (
                    state[f"{src}.{j}.conv.weight"],
                    state[f"{src}.{j}.conv.bias"],
                )

    for i in (0, 2):
        out[f"time_embed.mlp.{i}.weight"], out[f"time_embed.mlp.{i}.bias"] = (
            state[f"time_embed.{i}.weight"],
            state[f"time_embed.{i}.bias"],
        )
    if net.label_embed is not None:
        table = state["label_emb.weight"]
        null = torch.zeros(1, table.shape[1], dtype=table.dtype)  # ADM never trained a null class
        out["label_embed.embedding_table.weight"] = torch.cat([table, null])
    out["conv_in.weight"], out["conv_in.bias"] = state["input_blocks.0.0.weight"], state["input_blocks.0.0.bias"]
    for k, layers in enumerate(net.down):
        stage(f"input_blocks.{k + 1}", f"down.{k}", layers)
    stage("middle_block", "mid", net.mid)
    for k, layers in enumerate(net.up):
        stage(f"output_blocks.{k}", f"up.{k}", layers)
    out["norm_out.weight"], out["norm_out.bias"] = state["out.0.weight"], state["out.0.bias"]
    out["conv_out.weight"], out["conv_out.bias"] = state["out.2.weight"], state["out.2.bias"]
    return out


def adm_unet(
    state: dict,
    *,
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    attention_resolutions: str | tuple = "16,8",
    channel_mult: tuple | None = None,
    num_heads: int = 4,
    num_head_channels: int = -1,
    learn_sigma: bool = False,
    class_cond: bool = False,
    resblock_updown: bool = False,
    use_scale_shift_norm: bool = True,
    use_new_attention_order: bool = False,
    dropout: float = 0.0,
) -> UNet:
    """A difflab UNet holding a guided-diffusion state dict, built from guided-diffusion's own flags
    (the names of its scripts' --flags and defaults)."""
    if channel_mult is None:
        if image_size not in ADM_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult")
        channel_mult = ADM_CHANNEL_MULT[image_size]
    if isinstance(attention_resolutions, str):
        attention_resolutions = tuple(int(r) for r in attention_resolutions.split(",") if r)
    in_channels = int(state["input_blocks.0.0.weight"].shape[1])
    out_channels = int(state["out.2.weight"].shape[0])
    config = UNetConfig(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels // 2 if learn_sigma else out_channels,
        channels=num_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(r for r in attention_resolutions if r <= image_size),
        mid_attention=True,
        num_heads=num_heads,
        head_channels=None if num_head_channels == -1 else num_head_channels,
        dropout=dropout,
        num_classes=int(state["label_emb.weight"].shape[0]) if class_cond else None,
        learn_sigma=learn_sigma,
        resblock_updown=resblock_updown,
        use_scale_shift_norm=use_scale_shift_norm,
    )
    net = UNet(config)
    order = "new" if use_new_attention_order else "legacy"
    try:
        mapped = _adm_to_difflab(state, net, order)
    except KeyError as e:
        raise ValueError(
            f"the guided-diffusion state dict does not fit these flags: it has no tensor {e.args[0]!r} "
            "(check num_res_blocks, channel_mult, attention_resolutions)"
        ) from None
    _load_exact(net, mapped, "the guided-diffusion state dict")
    return net.eval()


def load_adm(path, *, diffusion_steps: int = 1000, noise_schedule: str = "linear", **flags) -> tuple:
    """(denoiser, config, None, None) of a guided-diffusion checkpoint -- `Pipeline.from_original(path,
    "adm", **flags)`: the UNet (`adm_unet` flags), ADM's schedule, eps prediction (with its learned
    variance when learn_sigma)."""
    net = adm_unet(read_state_dict(path), **flags)
    if noise_schedule == "linear":
        scale = 1000 / diffusion_steps  # ADM scales the DDPM betas to the step count
        schedule = vp_linear(diffusion_steps, 1e-4 * scale, 0.02 * scale)
    elif noise_schedule == "cosine":
        schedule = vp_cosine(diffusion_steps)
    else:
        raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {noise_schedule!r}")
    denoiser = Preconditioned(net, schedule, "eps", learned_variance=net.config.learn_sigma).eval()
    cfg = net.config
    config = {
        "model": {"arch": "unet", "num_classes": cfg.num_classes, "source": f"guided-diffusion {Path(path).name}"},
        "data": {"name": "adm", "channels": cfg.in_channels, "size": cfg.image_size},
        "schedule": schedule.to_config(),
        "prediction": "eps",
        "train": {"label_dropout": 0.0},  # ADM guides with a classifier, not classifier-free
    }
    return denoiser, config, None, None


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------


def dit_network(state: dict, num_heads: int | None = None) -> DiT:
    """A difflab DiT holding an original DiT state dict; the size is read from the tensors (heads
    from the paper's sizes, or `num_heads`)."""
    for key in (
        "x_embedder.proj.weight",
        "pos_embed",
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
    ):
        if key not in state:
            raise ValueError(f"not a DiT state dict: no {key}")
    w = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens = int(state["pos_embed"].shape[1])
    grid = round(tokens**0.5)
    if num_heads is None:
        sizes = {(d, n): h for d, n, h in DIT_SIZES.values()}
        if (hidden, depth) not in sizes:
            raise ValueError(f"a DiT of width {hidden} and depth {depth} is not a paper size: pass num_heads")
        num_heads = sizes[(hidden, depth)]
    out = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
    classes = int(state["y_embedder.embedding_table.weight"].shape[0])
    config = DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out // 2 if out == 2 * in_channels else out,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        num_classes=classes - 1,  # the last row is the null class
        learn_sigma=out == 2 * in_channels,
    )
    net = DiT(config)
    try:
        mine = _dit_to_difflab(state, depth, num_heads)
    except KeyError as e:
        raise ValueError(f"the DiT state dict has no tensor {e.args[0]!r}") from None
    _load_exact(net, mine, "the DiT state dict")
    known = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer.", "pos_embed")
    left = [k for k in state if not k.startswith(known)]
    if left:
        raise ValueError(f"the DiT state dict holds tensors difflab's DiT has no place for: {left[:4]}")
    theirs = state["pos_embed"].float().reshape(tokens, hidden)
    if not torch.allclose(theirs, net.pos_embed[0], atol=1e-5):
        raise ValueError("the file's pos_embed is not DiT's 2-D sin-cos grid; difflab's DiT computes that one")
    return net.eval()


def _dit_to_difflab(state: dict, depth: int, num_heads: int) -> dict:
    mine = {
        "patch_embed.weight": state["x_embedder.proj.weight"],
        "patch_embed.bias": state["x_embedder.proj.bias"],
        "label_embed.embedding_table.weight": state["y_embedder.embedding_table.weight"],
    }
    for i in (0, 2):
        for p in ("weight", "bias"):
            mine[f"time_embed.mlp.{i}.{p}"] = state[f"t_embedder.mlp.{i}.{p}"]
    for b in range(depth):
        src, dst = f"blocks.{b}", f"blocks.{b}"
        q, k, v = _split_qkv(state[f"{src}.attn.qkv.weight"], num_heads, "new")
        qb, kb, vb = _split_qkv(state[f"{src}.attn.qkv.bias"], num_heads, "new")
        mine.update({f"{dst}.attn.to_q.weight": q, f"{dst}.attn.to_k.weight": k, f"{dst}.attn.to_v.weight": v})
        mine.update({f"{dst}.attn.to_q.bias": qb, f"{dst}.attn.to_k.bias": kb, f"{dst}.attn.to_v.bias": vb})
        for a, m in (("attn.proj", "attn.to_out"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                mine[f"{dst}.{m}.{p}"] = state[f"{src}.{a}.{p}"]
        for p in ("weight", "bias"):
            mine[f"{dst}.ada_ln.1.{p}"] = state[f"{src}.adaLN_modulation.1.{p}"]
    for p in ("weight", "bias"):
        mine[f"final_layer.linear.{p}"] = state[f"final_layer.linear.{p}"]
        mine[f"final_layer.ada_ln.1.{p}"] = state[f"final_layer.adaLN_modulation.1.{p}"]
    return mine


def load_dit(path, vae: str | os.PathLike | None = None, num_heads: int | None = None) -> tuple:
    """(denoiser, config, None, latent space) of an original DiT checkpoint -- `Pipeline.from_original(
    path, "dit", vae=...)`: on the latents of a diffusers AutoencoderKL folder (`vae`; DiT used
    sd-vae-ft-ema/mse), or on raw tensors when vae is None."""
    net = dit_network(read_state_dict(path), num_heads)
    schedule = vp_linear(1000)
    denoiser = Preconditioned(net, schedule, "eps", learned_variance=net.config.learn_sigma).eval()
    cfg = net.config
    config = {
        "model": {"arch": "dit", "num_classes": cfg.num_classes, "source": f"DiT {Path(path).name}"},
        "data": {"name": "dit", "channels": cfg.in_channels, "size": cfg.input_size},
        "schedule": schedule.to_config(),
        "prediction": "eps",
        "train": {"label_dropout": 0.1},  # DiT's class_dropout_prob: the null row is trained
    }
    latent_space = None
    if vae is not None:
        from diffusers import AutoencoderKL

        from difflab.interop.folders import DiffusersLatentSpace

        auto = AutoencoderKL.from_pretrained(vae, use_safetensors=True)
        if auto.config.latent_channels != cfg.in_channels:
            raise ValueError(
                f"the VAE makes {auto.config.latent_channels}-channel latents, DiT takes {cfg.in_channels}"
            )
        factor = 2 ** (len(auto.config.block_out_channels) - 1)
        latent_space = DiffusersLatentSpace(auto, (cfg.in_channels, cfg.input_size, cfg.input_size))
        config["autoencoder"] = {"kind": "diffusers", "folder": str(vae)}
        config["data"] = {"name": "dit", "channels": int(auto.config.in_channels), "size": cfg.input_size * factor}
    return denoiser, config, None, latent_space
