"""Prompt-to-Prompt Image Editing with Cross-Attention Control.
Hertz et al. 2022, https://arxiv.org/abs/2208.01626 (official code: google/prompt-to-prompt).

The source prompt and its edits are generated together, from the same noise, as one batch
[source, edit_1, ..., edit_k] (times 2 under classifier-free guidance: every chunk of
n_prompts is controlled the same way). A `P2PController` is an attention hook
(core.attention) installed on any backbone — difflab's UNet or DiT, or a wrapped diffusers UNet —
so no attention processor is copied.

Notation (paper -> difflab):
    M_t (cross-attention maps)     -> the `probs` (B, heads, pixels, tokens) of cross layers
    Edit(M_t, M*_t, t)             -> `P2PController.probs`:
        word swap:  M*_t <- M_t for t < tau_c                    (`cross_replace`, fraction of steps)
        refine:     M*_t[:, j] <- M_t[:, A(j)] for aligned tokens (`mapper` from `refine_mapper`)
        reweight:   M*_t[:, j] <- c * M*_t[:, j]                 (`reweight` = {token index: c})
    self-attention injection for t < tau_s, layers <= 16x16      (`self_replace`, `self_max_pixels`)
    local blend (threshold 0.3 on averaged 16x16 maps of words)  (`blend_words`, `blend_threshold`)

A real image is edited by inverting it first (DDIM inversion under the source prompt, as the
paper's real-image section does) and starting both prompts from the inverted latent.

Usage::

    ctl = P2PController(n_prompts=2, num_steps=len(sigmas) - 1, cross_replace=0.8, self_replace=0.4)
    out = prompt_to_prompt(denoiser, unet, x_T, sigmas, text_cond, ctl)   # [source, edit]
    maps = ctl.token_maps(res=8)      # (n_prompts, tokens, 8, 8) averaged cross-attention
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.core.attention import AttentionHook, AttnContext, attention_hooks
from difflab.core.editing import EditContext, EditMethod, Knob
from difflab.core.sampling import Step, cat_conds, expand_cond, invert_euler, noise_source, sample

__all__ = ["P2PController", "prompt_to_prompt", "word_swap_mapper", "refine_mapper", "EDIT"]


def word_swap_mapper(source_tokens: list, edit_tokens: list) -> Tensor:
    """Word swap keeps token positions: both prompts must have the same number of tokens."""
    if len(source_tokens) != len(edit_tokens):
        raise ValueError(
            f"word swap needs prompts of equal token length: {len(source_tokens)} "
            f"({source_tokens}) vs {len(edit_tokens)} ({edit_tokens}); use refine_mapper"
        )
    return torch.arange(len(edit_tokens))


def refine_mapper(source_tokens: list, edit_tokens: list) -> Tensor:
    """For each edit token, the index of the aligned source token, or -1 for a new word."""
    mapper = torch.full((len(edit_tokens),), -1, dtype=torch.long)
    for block in difflib.SequenceMatcher(a=source_tokens, b=edit_tokens, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            mapper[block.b + k] = block.a + k
    return mapper


class P2PController(AttentionHook):
    """Cross/self-attention control for a batch [source, edits...] (per chunk of n_prompts).

    guided=True when the denoiser is wrapped by classifier-free guidance (core.guidance.cfg batches
    [conditional, unconditional]): only the conditional half is controlled, as in the official code."""

    def __init__(
        self,
        n_prompts: int,
        num_steps: int,
        *,
        cross_replace: float = 0.8,
        self_replace: float = 0.4,
        self_max_pixels: int = 16 * 16,
        mapper: Tensor | None = None,
        reweight: dict[int, float] | None = None,
        blend_words: list[int] | None = None,
        blend_threshold: float = 0.3,
        blend_res: int | None = None,
        store: bool = True,
        guided: bool = False,
    ):
        if n_prompts < 2:
            raise ValueError(f"Prompt-to-Prompt needs a source and at least one edit: n_prompts={n_prompts}")
        for name, v in (("cross_replace", cross_replace), ("self_replace", self_replace)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a fraction of the steps in [0, 1], got {v}")
        self.n, self.num_steps = n_prompts, num_steps
        self.cross_replace, self.self_replace = cross_replace, self_replace
        self.self_max_pixels = self_max_pixels
        self.mapper, self.reweight = mapper, reweight or {}
        self.blend_words, self.blend_threshold, self.blend_res = blend_words, blend_threshold, blend_res
        self.store_maps = store or blend_words is not None
        # under core.guidance.cfg the batch is [conditional chunks, unconditional chunks]: the official
        # code controls only the conditional half, so that the edit's unconditional branch runs free
        self.guided = guided
        self.step = 0
        self.last_blend_mask: Tensor | None = None
        self.maps: dict[tuple[int, int], Tensor] = {}  # (h, w) -> summed cross maps (n, tokens, h, w)
        self.counts: dict[tuple[int, int], int] = {}
        self._step_maps: dict[tuple[int, int], list[Tensor]] = {}

    # ---- the hook ---------------------------------------------------------------------------

    def _chunks(self, p: Tensor) -> Tensor:
        if p.shape[0] % self.n:
            raise ValueError(f"attention batch {p.shape[0]} is not a multiple of n_prompts {self.n}")
        return p.reshape(p.shape[0] // self.n, self.n, *p.shape[1:])  # (chunks, n, H, Lq, Lk)

    def probs(self, ctx: AttnContext, p: Tensor) -> Tensor:
        if self.guided:
            if p.shape[0] % (2 * self.n):
                raise ValueError(
                    f"guided=True: attention batch {p.shape[0]} is not [conditional, unconditional] "
                    f"halves of n_prompts {self.n} chunks"
                )
            h = p.shape[0] // 2
            return torch.cat([self._control(ctx, p[:h]), p[h:]])
        return self._control(ctx, p)

    def _control(self, ctx: AttnContext, p: Tensor) -> Tensor:
        frac = self.step / max(1, self.num_steps)
        q = self._chunks(p)
        if ctx.cross:
            if self.store_maps and ctx.hw is not None and len(ctx.hw) == 2:
                self._record(ctx.hw, q[0])
            src, edits = q[:, :1], q[:, 1:]
            if frac < self.cross_replace:
                if self.mapper is None:
                    new = src.expand_as(edits)
                else:
                    m = self.mapper.to(p.device)
                    if m.numel() != p.shape[-1]:
                        m = F.pad(m, (0, p.shape[-1] - m.numel()), value=-1)[: p.shape[-1]]
                    gathered = src[..., m.clamp(min=0)].expand_as(edits)
                    new = torch.where(m >= 0, gathered, edits)  # new words keep their own maps
                edits = new
            if self.reweight:
                w = torch.ones(p.shape[-1], dtype=p.dtype, device=p.device)
                for j, c in self.reweight.items():
                    w[j] = c
                edits = edits * w
            q = torch.cat([src, edits], dim=1)
        elif frac < self.self_replace and ctx.hw is not None and math.prod(ctx.hw) <= self.self_max_pixels:
            q = torch.cat([q[:, :1], q[:, :1].expand_as(q[:, 1:])], dim=1)
        return q.reshape(p.shape)

    def _record(self, hw: tuple[int, int], p: Tensor) -> None:
        """Accumulate the first chunk's (conditional) cross maps per resolution: (n, tokens, h, w)."""
        maps = p.mean(1).transpose(1, 2).reshape(self.n, p.shape[-1], *hw).detach()  # (n, H, HW, T) -> (n, T, h, w)
        self.maps[hw] = self.maps.get(hw, 0) + maps
        self.counts[hw] = self.counts.get(hw, 0) + 1
        self._step_maps.setdefault(hw, []).append(maps)

    # ---- per-step callback (step counter and local blend) -----------------------------------

    def callback(self, step: Step) -> Tensor | None:
        """Pass as the sampler's callback: advances the step counter, applies the local blend."""
        self.step += 1
        out = None
        if self.blend_words is not None and self._step_maps:
            mask = self._blend_mask(step.x.shape[-2:])  # (n, 1, H, W)
            self.last_blend_mask = mask
            x = step.x.reshape(-1, self.n, *step.x.shape[1:])  # (chunks, n, C, H, W)
            src = x[:, :1]
            x = src + mask[None] * (x - src)  # outside the words' region, edits follow the source
            out = x.reshape(step.x.shape)
        self._step_maps = {}
        return out

    def _blend_mask(self, size) -> Tensor:
        res = self.blend_res or min(self._step_maps, key=lambda hw: abs(hw[0] - 16))[0]
        maps = [torch.stack(v).mean(0) for hw, v in self._step_maps.items() if hw[0] == res]
        if not maps:
            raise ValueError(f"no cross-attention maps at resolution {res}; have {sorted(self._step_maps)}")
        m = maps[0][:, self.blend_words].sum(1, keepdim=True)  # (n, 1, res, res)
        m = F.max_pool2d(m, 3, stride=1, padding=1)  # the paper dilates the map a little
        m = F.interpolate(m, size=tuple(size), mode="nearest")
        m = m / m.flatten(1).max(1).values.clamp(min=1e-12).reshape(-1, 1, 1, 1)
        union = (m > self.blend_threshold).any(0, keepdim=True).to(m.dtype)  # source or edit words
        return union.expand(self.n, -1, -1, -1)

    # ---- visualisation ----------------------------------------------------------------------

    def token_maps(self, res: int | None = None) -> Tensor:
        """Average cross-attention per token over layers and steps at one resolution: (n, T, h, w)."""
        if not self.maps:
            raise ValueError("no cross-attention maps stored (was the controller installed with store=True?)")
        hw = min(self.maps, key=lambda k: abs(k[0] - (res or 16)))
        return self.maps[hw] / self.counts[hw]


@torch.no_grad()
def prompt_to_prompt(
    denoiser,
    model: nn.Module,
    x: Tensor,
    sigmas: Tensor,
    cond: dict,
    controller: P2PController,
    *,
    method: str = "euler",
    noise=None,
    progress: bool = False,
    **sampler_kw,
) -> Tensor:
    """Generate [source, edit_1, ..., edit_k] from one start under the controller (the paper's Algorithm 1).

    x (1 or n, C, H, W) at sigmas[0]; `cond` holds the n prompts' conditions in that order (batch-1
    entries are shared); `model` is the module whose attention layers are hooked (the backbone, or
    the denoiser when it is an nn.Module). Stochastic samplers draw one noise for all prompts.
    """
    n = controller.n
    if controller.num_steps != len(sigmas) - 1:
        raise ValueError(f"controller counts {controller.num_steps} steps, the grid has {len(sigmas) - 1}")
    if x.shape[0] not in (1, n):
        raise ValueError(f"start x has batch {x.shape[0]}; expected 1 or n_prompts = {n}")
    x = x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x
    draw = noise_source(noise)

    def shared(i: int, like: Tensor) -> Tensor:  # the same noise for every prompt of the batch
        return draw(i, like[:1]).expand_as(like)

    with attention_hooks(model, controller):
        return sample(
            denoiser,
            x,
            sigmas,
            method=method,
            cond=expand_cond(cond, n),
            callback=controller.callback,
            noise=shared,
            progress=progress,
            **sampler_kw,
        )


def _edit(
    ctx: EditContext,
    *,
    edit: str,
    cross_replace: float,
    self_replace: float,
    self_max_pixels: int,
    strength: float,
    reweight_token: int | None,
    reweight_scale: float,
) -> Tensor:
    """Invert the real image under the source prompt, then regenerate [source, edit] from that latent."""
    mapper, reweight = None, None
    has_tokens = ctx.prompts.conditioning == "text"
    if edit != "swap":
        if not has_tokens:
            raise ValueError(
                f"p2p --edit {edit} works on token maps and needs a text-conditional model; this run is "
                f"{ctx.prompts.conditioning}-conditional: use --edit swap"
            )
        if edit == "refine":
            mapper = refine_mapper(ctx.prompts.token_ids(ctx.source_prompt), ctx.prompts.token_ids(ctx.prompt))
        else:  # reweight
            n_tokens = len(ctx.prompts.token_ids(ctx.prompt))
            if reweight_token is None or not 0 <= reweight_token < n_tokens:
                raise ValueError(
                    f"p2p --edit reweight needs --reweight-token in 0..{n_tokens - 1} (the token of "
                    f"--prompt to scale), got {reweight_token}"
                )
            reweight = {reweight_token: reweight_scale}
    src, dst = ctx.cond(ctx.source_prompt, "--source-prompt"), ctx.cond(ctx.prompt, "--prompt")
    tail = ctx.tail(strength)
    x_T = invert_euler(ctx.denoiser, ctx.image, tail.flip(0), cond=src, progress=ctx.progress)
    ctl = P2PController(
        2,
        len(tail) - 1,
        cross_replace=cross_replace,
        self_replace=self_replace,
        self_max_pixels=self_max_pixels,
        mapper=mapper,
        reweight=reweight,
        store=False,
    )
    both = prompt_to_prompt(
        ctx.denoiser,
        ctx.denoiser,
        x_T,
        tail,
        cat_conds(src, dst),
        ctl,
        method=ctx.sampler,
        noise=ctx.generator,
        progress=ctx.progress,
    )
    ctx.tiles.append(("source (inverted and regenerated)", both[:1]))
    if not has_tokens:
        ctx.info["note"] = (
            "this run's model has no cross-attention (it is not text-conditional): the edit keeps "
            "the source's layout through self-attention injection only"
        )
    return both[1:]


_FRACTION = dict(lo=0.0, hi=1.0)

EDIT = EditMethod(
    "p2p",
    "Prompt-to-Prompt (Hertz et al. 2022, arXiv 2208.01626)",
    "DDIM-invert the input under --source-prompt, then regenerate [source, edit] from the same latent, injecting "
    "the source's attention maps into the edit.",
    mask=None,
    mask_keeps=None,
    prompt="required",
    source_prompt="required",
    sampler="euler",
    knobs=(
        Knob(
            "edit",
            "swap",
            "edit kind: 'swap' (the edit keeps the source's maps), 'refine' (aligned tokens), "
            "'reweight' (scale one token's maps); refine and reweight need token maps (a "
            "text-conditional model)",
            type=str,
            choices=("swap", "refine", "reweight"),
        ),
        Knob(
            "cross_replace",
            0.8,
            "fraction of the steps with cross-attention injected (tau_c)",
            metavar="FRAC",
            **_FRACTION,
        ),
        Knob(
            "self_replace",
            0.4,
            "fraction of the steps with self-attention injected (tau_s)",
            metavar="FRAC",
            **_FRACTION,
        ),
        Knob(
            "self_max_pixels",
            256,
            "self-attention is injected in layers of at most this many pixels (paper: 16x16)",
            type=int,
            metavar="P",
            lo=1,
        ),
        Knob(
            "strength",
            1.0,
            "diffusion time t0 the input is inverted to and regenerated from (1: from pure noise), "
            "independent of --steps",
            metavar="FRAC",
            lo=0.0,
            hi=1.0,
            lo_open=True,
        ),
        Knob("reweight_token", None, "--edit reweight: the token index to scale", type=int, metavar="I", lo=0),
        Knob("reweight_scale", 2.0, "--edit reweight: the scale c of that token's maps", metavar="C"),
    ),
    run=_edit,
)
