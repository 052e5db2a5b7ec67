"""Hugging Face diffusers UNets as difflab networks and denoisers, with difflab's attention hooks.

`DiffusersUNet(unet)` gives a `UNet2DModel` or `UNet2DConditionModel` difflab's network call
convention, so `Preconditioned` (and through it every sampler, guidance transform and editing
method) runs it unchanged. It also replaces the attention processor of every diffusers
`Attention` layer by `DifflabAttnProcessor`, which sends q, k, v through
`difflab.core.attention.attention` with the layer's name, self/cross flag and spatial size, so
`core.attention_hooks` (attention stores, Prompt-to-Prompt, visualisation) work on the wrapped
UNet as on difflab's own backbones, with no copied processor per method.

Call convention (difflab -> diffusers):

| difflab `net(x, t, **cond)`                  | diffusers `unet(...)`                             |
|----------------------------------------------|---------------------------------------------------|
| x (B, C, H, W), already scaled by c_in       | sample                                            |
| t (B,): c_noise = the schedule's t(sigma)    | timestep (fractional between trained timesteps)   |
| class_labels (B,) long                       | class_labels (diffusers has no null class: -1 fails) |
| context (B, T, D), context_mask (B, T) bool  | encoder_hidden_states, encoder_attention_mask     |
| x_cond (B, C', H, W)                         | concatenated to sample (in_channels = C + C')     |

diffusers is never imported here: the wrapper works on any object with diffusers' UNet forward
and `Attention` layout, so importing difflab never imports diffusers.

Usage::

    from diffusers import UNet2DConditionModel, DDPMScheduler
    unet = UNet2DConditionModel.from_pretrained("sd/unet")
    D = diffusers_denoiser(unet, DDPMScheduler.from_pretrained("sd/scheduler").config)
    x0_hat = D(x, sigma, context=tokens, context_mask=mask)
    with attention_hooks(D, P2PController(2, num_steps)):     # every attention layer of the UNet
        ...
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from difflab.core.attention import AttnContext, attention, register_hook_setter
from difflab.core.denoiser import Preconditioned
from difflab.core.schedules import DiscreteVP, vp_cosine, vp_linear, vp_scaled_linear

__all__ = [
    "DiffusersUNet",
    "DifflabAttnProcessor",
    "diffusers_denoiser",
    "install_attention_processors",
    "prediction_from_diffusers",
    "schedule_from_diffusers",
]

# The processors whose computation DifflabAttnProcessor reproduces exactly (plain attention).
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "DifflabAttnProcessor")
_MASK_BIAS_MAX = -1e3  # additive mask values at or below this count as "masked out" (diffusers: -10000)


# --------------------------------------------------------------------------------------------
# Attention: a diffusers processor that routes through core.attention
# --------------------------------------------------------------------------------------------


class _Frame:
    """The spatial size (H, W) of the UNet's current input, for layers that see flat tokens."""

    hw: tuple[int, int] | None = None

    def infer(self, length: int) -> tuple[int, int] | None:
        """(h, w) of a token sequence of `length` at a downsampling 2^k of the input, if any."""
        if self.hw is None:
            return None
        H, W = self.hw
        for k in range(12):
            s = 2**k
            h, w = -(-H // s), -(-W // s)  # diffusers' stride-2 convs round up
            if h * w == length:
                return (h, w)
            if h * w < length:
                break
        return None


def _keep_mask(bias: Tensor, batch: int, heads: int, lq: int, lk: int) -> Tensor:
    """diffusers' additive attention mask (0 = attend, -10000 = not) -> bool, broadcastable 4-D."""
    if bias.dtype == torch.bool:
        keep = bias
    else:
        soft = (bias != 0) & (bias > _MASK_BIAS_MAX)
        if soft.any():
            raise ValueError(
                f"attention mask value {bias[soft][0].item()} is neither 0 nor a large negative "
                "bias: difflab's attention takes boolean (keep / drop) masks only"
            )
        keep = bias == 0
    if keep.shape[-1] != lk:
        raise ValueError(f"attention mask of shape {tuple(keep.shape)} does not fit {lk} keys")
    if keep.ndim == 2:  # (B, Lk)
        return keep[:, None, None, :]  # (B, 1, 1, Lk)
    if keep.ndim == 3:
        if keep.shape[0] == batch:  # (B, Lq|1, Lk)
            return keep[:, None]  # (B, 1, Lq|1, Lk)
        if keep.shape[0] == batch * heads:  # (B*heads, Lq|1, Lk)
            return keep.reshape(batch, heads, keep.shape[1], lk)  # (B, heads, Lq|1, Lk)
    if keep.ndim == 4:
        return keep
    raise ValueError(
        f"attention mask of shape {tuple(keep.shape)} does not fit batch {batch}, {heads} heads, "
        f"{lq} queries and {lk} keys"
    )


class DifflabAttnProcessor:
    """A diffusers attention processor computing AttnProcessor2_0's function through
    `core.attention.attention`, so difflab's hooks see (and may change) every call.

    `name` and `hook` are set by `core.attention_hooks`; `frame` tells layers that receive flat
    (B, H*W, C) tokens the spatial size of their queries.
    """

    def __init__(self, frame: _Frame | None = None):
        self.frame = frame or _Frame()
        self.name = ""
        self.hook: Any = None

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
            hw = (h, w)
        else:
            hw = None
        b, lq, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        cross = encoder_hidden_states is not None
        if not cross:
            source = hidden_states
        elif attn.norm_cross:
            source = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            source = encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(b, -1, heads, head_dim).transpose(1, 2)  # (B, Lq, H*D) -> (B, H, Lq, D)
        key = key.view(b, -1, heads, head_dim).transpose(1, 2)  # (B, Lk, H*D) -> (B, H, Lk, D)
        value = value.view(b, -1, heads, value.shape[-1] // heads).transpose(1, 2)  # (B, H, Lk, Dv)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        factor = float(attn.scale) * math.sqrt(head_dim)  # attention() scales by 1/sqrt(D); diffusers by attn.scale
        if abs(factor - 1.0) > 1e-6:
            query = query * factor
        mask = None
        if attention_mask is not None:
            mask = _keep_mask(attention_mask, b, heads, lq, key.shape[-2])

        if self.hook is None:
            out = attention(query, key, value, None, mask)
        else:
            ctx = AttnContext(self.name, cross, hw or self.frame.infer(lq), self.hook)
            out = attention(query, key, value, ctx, mask)  # (B, H, Lq, Dv)
        out = out.transpose(1, 2).reshape(b, lq, -1).to(query.dtype)  # (B, H, Lq, Dv) -> (B, Lq, H*Dv)
        out = attn.to_out[0](out)  # linear projection
        out = attn.to_out[1](out)  # dropout
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _is_diffusers_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor") and hasattr(module, "to_q")


def install_attention_processors(unet: nn.Module) -> list[str]:
    """Give every diffusers `Attention` layer of `unet` its own `DifflabAttnProcessor`.

    Returns the layer names. Raises ValueError naming a layer whose processor computes something
    else than plain attention (added key/values, IP-adapters, LoRA processors...): its calls could
    not be routed through difflab's hooks without changing the network's function.
    """
    frame = getattr(unet, "_difflab_frame", None)
    if frame is None:
        frame = _Frame()

        def remember_size(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            if isinstance(sample, Tensor) and sample.ndim == 4:
                frame.hw = tuple(sample.shape[-2:])

        unet.register_forward_pre_hook(remember_size, with_kwargs=True)
        unet._difflab_frame = frame
    layers = [(name, m) for name, m in unet.named_modules() if _is_diffusers_attention(m)]
    unsupported = [
        (name, type(m.processor).__name__) for name, m in layers if type(m.processor).__name__ not in _PLAIN_PROCESSORS
    ]
    if unsupported:
        name, kind = unsupported[0]
        raise ValueError(
            f"attention layer {name!r} uses the diffusers processor {kind}, which difflab cannot "
            f"route through its hooks (supported: {', '.join(_PLAIN_PROCESSORS[:2])}); "
            f"{len(unsupported)} such layer(s)"
        )
    for _, module in layers:
        module.set_processor(DifflabAttnProcessor(frame))
    return [name for name, _ in layers]


@register_hook_setter
def _set_processor_hook(module: nn.Module, name: str, hook: Any) -> bool:
    """Let `core.attention_hooks` install hooks on diffusers layers that carry our processor."""
    processor = getattr(module, "processor", None) if _is_diffusers_attention(module) else None
    if isinstance(processor, DifflabAttnProcessor):
        processor.name, processor.hook = name, hook
        return True
    return False


# --------------------------------------------------------------------------------------------
# The network wrapper
# --------------------------------------------------------------------------------------------


class DiffusersUNet(nn.Module):
    """A diffusers `UNet2DModel` / `UNet2DConditionModel` with difflab's network signature

        net(x, t, *, class_labels=None, context=None, context_mask=None, x_cond=None)

    Its attention layers get `DifflabAttnProcessor`s (the UNet is changed in place; its weights
    and function are not).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        params = inspect.signature(unet.forward).parameters
        # UNets take `sample`, transformers (DiTTransformer2DModel) `hidden_states`
        self.input_name = next((n for n in ("sample", "hidden_states") if n in params), None)
        if self.input_name is None or "timestep" not in params:
            raise TypeError(
                f"{type(unet).__name__} does not have a diffusers forward(sample or hidden_states, timestep, ...)"
            )
        self.unet = unet
        self.takes_context = "encoder_hidden_states" in params
        self.null_class = _null_class(unet)
        self.attention_layers = install_attention_processors(unet)

    @property
    def num_classes(self) -> int | None:
        """Classes of the class embedding (None: the network takes no class labels)."""
        if getattr(self.unet, "class_embedding", None) is not None:
            return int(self.unet.config.num_class_embeds or self.unet.class_embedding.num_embeddings)
        n = getattr(self.unet.config, "num_embeds_ada_norm", None)
        return int(n) if n is not None and self.input_name == "hidden_states" else None

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        x_cond: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) -> the UNet's output (B, out_channels, H, W)."""
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        dtype = next(self.unet.parameters()).dtype
        if x_cond is not None:
            x = torch.cat([x, x_cond.to(x.dtype)], dim=1)  # (B, C + C_cond, H, W)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"the diffusers UNet takes {self.in_channels} input channels, got {x.shape[1]}"
                + (" (x and x_cond together)" if x_cond is not None else "")
            )
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(x.shape[0]) if t.numel() == 1 else t
        kwargs: dict[str, Any] = {}
        if class_labels is not None:
            if self.num_classes is None:
                raise ValueError(f"class_labels given to a {type(self.unet).__name__} without a class embedding")
            labels = torch.as_tensor(class_labels, device=x.device)
            if labels.dtype.is_floating_point:
                raise ValueError(f"class labels must be an integer tensor, got dtype {labels.dtype}")
            labels = labels.reshape(-1).expand(x.shape[0]) if labels.numel() == 1 else labels
            if (labels < 0).any():
                if self.null_class is None:
                    raise ValueError(
                        f"class label {labels[labels < 0][0].item()} is not valid for this "
                        f"{type(self.unet).__name__}: its class embedding has no null class (-1)"
                    )
                labels = torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
            kwargs["class_labels"] = labels
        if self.takes_context:
            if context is None:
                raise ValueError(
                    f"{type(self.unet).__name__} needs context (B, T, {self.unet.config.cross_attention_dim}) tokens"
                )
            kwargs["encoder_hidden_states"] = context.to(dtype)
            if context_mask is not None:
                if context_mask.shape != context.shape[:2]:
                    raise ValueError(
                        f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
                    )
                kwargs["encoder_attention_mask"] = context_mask.to(dtype)  # diffusers: 1 = keep
        elif context is not None or context_mask is not None:
            raise ValueError(f"context given to {type(self.unet).__name__}, which has no cross-attention")
        kwargs[self.input_name] = x.to(dtype)
        return self.unet(timestep=t.to(x.device), return_dict=False, **kwargs)[0]


def _null_class(model: nn.Module) -> int | None:
    """The label index of the unconditional row of a class embedding, if it has one: DiT's label
    table holds num_classes + 1 rows (the last is the null class of classifier-free guidance);
    a UNet2DModel's class embedding has none."""
    n = getattr(model.config, "num_embeds_ada_norm", None)
    if n is None:
        return None
    for module in model.modules():
        table = getattr(module, "embedding_table", None)
        if isinstance(table, nn.Embedding) and table.num_embeddings == int(n) + 1:
            return int(n)
    return None


# --------------------------------------------------------------------------------------------
# Schedules and the denoiser
# --------------------------------------------------------------------------------------------

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def schedule_from_diffusers(config: Mapping[str, Any] | None = None) -> DiscreteVP:
    """The DiscreteVP of a diffusers scheduler config (DDPM/DDIM/...: betas over num_train_timesteps).

    beta_schedule "linear" (DDPM), "scaled_linear" (LDM / Stable Diffusion), "squaredcos_cap_v2"
    (Improved DDPM's cosine) or `trained_betas`; diffusers' defaults fill missing keys (beta_start
    1e-4, beta_end 0.02, whatever the schedule, as DDPMScheduler's).
    """
    config = dict(config or {})
    T = int(config.get("num_train_timesteps", 1000))
    # Euler-type schedulers place fractional timesteps by interpolating sigma linearly
    interpolation = "linear" if config.get("interpolation_type") == "linear" else "log"
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        return DiscreteVP(betas, interpolation=interpolation)
    kind = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        schedule = {
            "linear": lambda: vp_linear(T, b0, b1),
            "scaled_linear": lambda: vp_scaled_linear(T, b0, b1),
            "squaredcos_cap_v2": lambda: vp_cosine(T),
        }[kind]()
        return dataclasses.replace(schedule, interpolation=interpolation) if interpolation != "log" else schedule
    raise ValueError(
        f"unsupported diffusers beta_schedule {kind!r}; known: 'linear', 'scaled_linear', "
        "'squaredcos_cap_v2' (or trained_betas)"
    )


def prediction_from_diffusers(config: Mapping[str, Any] | None = None) -> str:
    """difflab's prediction name for a scheduler config's prediction_type ("epsilon" -> "eps"...)."""
    kind = dict(config or {}).get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(f"unsupported diffusers prediction_type {kind!r}; known: {', '.join(_PREDICTIONS)}")
    return _PREDICTIONS[kind]


def diffusers_denoiser(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any] | None = None,
    *,
    prediction: str | None = None,
    learned_variance: bool | None = None,
) -> Preconditioned:
    """`Preconditioned(DiffusersUNet(unet), DiscreteVP from the scheduler config, prediction)`.

    Default: DDPM's linear schedule and eps prediction. c_noise is the schedule's fractional
    timestep t(sigma), what diffusers' UNets are trained on (0 .. num_train_timesteps - 1).
    `learned_variance` defaults to "twice as many output as input channels" (DeepFloyd IF).
    """
    net = unet if isinstance(unet, DiffusersUNet) else DiffusersUNet(unet)
    schedule = schedule_from_diffusers(scheduler_config)
    prediction = prediction or prediction_from_diffusers(scheduler_config)
    if learned_variance is None:
        learned_variance = net.out_channels == 2 * net.in_channels
    return Preconditioned(net, schedule, prediction, learned_variance=learned_variance).eval()
