"""`difflab ui [--port N]`: a browser app on localhost to sample, edit and compare samplers.

Tabs:
- **Sample**: a zoo model or a run folder, sampler, steps, guidance, seed, and a prompt (text
  models) or class (class models, by name or index; empty cycles through the classes).
- **Edit**: upload an image, paint the region to change (or upload a black-and-white mask of the
  image's size), pick a method; its knobs come from the editing registry
  (`difflab.methods.editing`), with their defaults and ranges.
- **Compare samplers**: several samplers on the same noise, side by side.

Long work shows progress (the samplers' tqdm bars); a bad input (no image, a mask of another size,
an unknown run folder, a prompt the model cannot take) is a message in the page, and the app
keeps serving. The handlers are plain functions (`sample_images`, `edit_image`,
`compare_samplers`), usable without a browser.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.core.sampling import DEFAULT_SAMPLER, SAMPLERS
from difflab.core.validation import POS_INT, add_device_arguments, add_memory_argument, check_number
from difflab.methods.editing import EDIT_METHODS

__all__ = ["build_app", "sample_images", "edit_image", "compare_samplers", "add_ui_parser", "MODEL_CHOICES", "zoo_path"]

MAX_IMAGES = 64
DISPLAY_PX = 256  # images are shown upscaled (nearest) to about this size


def _zoo_names() -> list[str]:
    from difflab import zoo

    return zoo.names()


MODEL_CHOICES = _zoo_names()


PLACEMENT = {"device": "auto", "dtype": "fp32", "low_memory": False}  # `difflab ui --device --dtype --low-memory`


@functools.lru_cache(maxsize=8)
def _load(path: str):
    from difflab.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path).to(PLACEMENT["device"], PLACEMENT["dtype"])
    if PLACEMENT["low_memory"]:
        pipe.enable_low_memory()
    return pipe


def zoo_path(name: str) -> Path:
    from difflab import zoo

    return zoo.ZOO_DIR / name


def _pipe(model: str | None, run_folder: str | None):
    """The pipeline of a run folder (when given) or a zoo model; a ValueError naming what is missing."""
    from difflab import zoo

    folder = (run_folder or "").strip()
    if folder:
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"run folder {folder!r} not found (it needs config.json and model.safetensors)")
        return _load(str(path.resolve()))
    if not model:
        raise ValueError("choose a zoo model or give a run folder")
    if model not in zoo.names():
        raise ValueError(f"unknown zoo model {model!r}; known: {', '.join(zoo.names())}")
    return _load(str(zoo_path(model)))


def _show(images: torch.Tensor, labels: list[str] | None = None, nrow: int | None = None) -> Image.Image:
    """Images (N, C, H, W) in [-1, 1] as one upscaled grid (PIL)."""
    from difflab.data.images import to_uint8

    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    scale = max(1, DISPLAY_PX // max(h, w)) if n == 1 else max(1, (DISPLAY_PX // 2) // max(h, w))
    pad = 2
    grid = np.full((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, 3), 255, np.uint8)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        im = np.repeat(np.repeat(pixels[i], scale, 0), scale, 1)
        if c == 1:
            im = np.repeat(im, 3, 2)
        r, k = divmod(i, nrow)
        y, x = pad + r * (h * scale + pad), pad + k * (w * scale + pad)
        grid[y : y + h * scale, x : x + w * scale] = im
    out = Image.fromarray(grid)
    if labels:
        from PIL import ImageDraw

        canvas = Image.new("RGB", (out.width, out.height + 14 * rows), "white")
        draw = ImageDraw.Draw(canvas)
        for i, label in enumerate(labels):
            r, k = divmod(i, nrow)
            y = r * (h * scale + pad + 14)
            canvas.paste(out.crop((0, r * (h * scale + pad), out.width, (r + 1) * (h * scale + pad) + pad)), (0, y))
            draw.text((pad + k * (w * scale + pad), y + h * scale + pad + 1), label[:40], fill="black")
        out = canvas
    return out


def _error(e: BaseException) -> str:
    if isinstance(e, (ValueError, FileNotFoundError, OSError, FloatingPointError, KeyError, TypeError)):
        return "**Error:** " + " ".join(str(e).split())
    traceback.print_exc()  # on the server's console; the page gets one line
    return f"**Error:** {type(e).__name__}: " + " ".join(str(e).split())


def _conditioning(pipe, prompt: str | None, n: int) -> dict:
    """Pipeline keyword arguments for a prompt: text for text models, a class name/index for class models."""
    text = (prompt or "").strip()
    if pipe.conditioning == "text":
        return {"prompt": text}
    if pipe.conditioning == "class":
        if not text:
            return {}  # cycle through the classes
        return {"class_labels": int(pipe.cond(text, "class")["class_labels"][0])}
    if text:
        raise ValueError(f"prompt {text!r}: this model is unconditional and takes none")
    return {}


# --------------------------------------------------------------------------------------------
# The handlers (plain functions: image or None, a status line in Markdown)
# --------------------------------------------------------------------------------------------


def sample_images(model, run_folder, sampler, steps, guidance, seed, prompt, n):
    """Sample n images; returns (grid image or None, status Markdown)."""
    try:
        pipe = _pipe(model, run_folder)
        n = check_number("images", int(n), lo=1, hi=MAX_IMAGES, integer=True)
        steps = check_number("steps", int(steps), lo=1, hi=1000, integer=True)
        seed = check_number("seed", int(seed), lo=0, integer=True)
        kw = _conditioning(pipe, prompt, n)
        if guidance != 1.0 and pipe.conditioning == "none":
            raise ValueError("guidance needs a class- or text-conditional model; set it to 1")
        x = pipe(n, sampler=sampler, steps=steps, seed=seed, guidance_scale=float(guidance), progress=True, **kw)
        what = f"prompt {kw['prompt']!r}" if "prompt" in kw else ("class " + str(kw["class_labels"]) if kw else "")
        return _show(x), f"{n} images, {sampler}, {steps} steps, guidance {guidance:g}, seed {seed} {what}".strip()
    except Exception as e:  # noqa: BLE001 - every failure is a message in the page
        return None, _error(e)


def compare_samplers(model, run_folder, samplers, steps, guidance, seed, prompt, n):
    """The same noise through each sampler; returns (grid with one row per sampler, status)."""
    try:
        if not samplers:
            raise ValueError("choose at least one sampler")
        pipe = _pipe(model, run_folder)
        n = check_number("images per sampler", int(n), lo=1, hi=16, integer=True)
        steps = check_number("steps", int(steps), lo=1, hi=1000, integer=True)
        seed = check_number("seed", int(seed), lo=0, integer=True)
        kw = _conditioning(pipe, prompt, n)
        rows, labels = [], []
        for s in samplers:
            rows.append(pipe(n, sampler=s, steps=steps, seed=seed, guidance_scale=float(guidance), **kw))
            labels += [s] * n
        return _show(torch.cat(rows), labels, nrow=n), f"{len(samplers)} samplers, {steps} steps, seed {seed}"
    except Exception as e:  # noqa: BLE001
        return None, _error(e)


def _as_array(image) -> np.ndarray | None:
    """An uploaded image (numpy array or PIL image) as an array; None stays None."""
    return None if image is None else np.asarray(image)


def _image_tensor(array: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """An uploaded image (H, W[, 3|4]) uint8 -> (1, C, size, size) in [-1, 1] (centre crop and resize)."""
    from difflab.data.images import _flatten_alpha, _resize_crop

    im = _flatten_alpha(Image.fromarray(array.astype(np.uint8)))
    im = _resize_crop(im.convert("L" if channels == 1 else "RGB"), size)
    a = np.asarray(im, dtype=np.float32).reshape(size, size, -1)
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1


def _mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """A painted or uploaded mask (H, W[, C]) -> (1, 1, size, size) in {0, 1}, 1 = the region to change."""
    from difflab.data.images import _resize_crop

    m = (mask > 127).astype(np.uint8) * 255
    im = _resize_crop(Image.fromarray(m), size, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(im) > 127).astype(np.float32))[None, None]


def _painted(editor) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(background image, painted mask: white where any layer was painted) of an ImageEditor value."""
    if editor is None:
        return None, None
    if isinstance(editor, dict):
        background = _as_array(editor.get("background"))
        layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
        painted = None
        for layer in layers:
            alpha = (
                layer[..., 3]
                if layer.ndim == 3 and layer.shape[2] == 4
                else (layer.max(-1) if layer.ndim == 3 else layer)
            )
            painted = alpha if painted is None else np.maximum(painted, alpha)
        if painted is not None and not painted.any():
            painted = None
        return background, (None if painted is None else (painted > 0).astype(np.uint8) * 255)
    return _as_array(editor), None


def edit_image(model, run_folder, method, editor, mask_file, prompt, source_prompt, steps, seed, *knob_values):
    """Edit the uploaded image with `method`; returns (strip image or None, status).

    The painted (or uploaded) mask marks the region to change, for every method: RePaint's
    own convention (white = keep) is applied here."""
    from difflab.edit import edit

    try:
        if method not in EDIT_METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(EDIT_METHODS)}")
        spec = EDIT_METHODS[method]
        background, painted = _painted(editor)
        if background is None or background.size == 0:
            raise ValueError("upload an image to edit first")
        upload = _as_array(mask_file)
        if upload is not None:
            if upload.shape[:2] != background.shape[:2]:
                raise ValueError(
                    f"the mask is {upload.shape[1]}x{upload.shape[0]}, the image {background.shape[1]}x"
                    f"{background.shape[0]}: a mask must have the image's size"
                )
            painted = upload if upload.ndim == 2 else upload[..., :3].max(-1)
        pipe = _pipe(model, run_folder)
        C, H, _ = pipe.image_shape()
        image = _image_tensor(background, C, H)
        mask = None
        if painted is not None and spec.mask is not None:
            mask = _mask_tensor(painted, H)
            if spec.mask_keeps == "white":
                mask = 1 - mask  # RePaint's mask marks the known pixels
        elif spec.mask == "required":
            raise ValueError(f"{method} needs a mask: paint the region to change (or upload a mask)")
        knobs = _knob_kwargs(method, knob_values)
        result = edit(
            pipe,
            method,
            image,
            mask=mask,
            prompt=(prompt or None) if spec.prompt != "none" else None,
            source_prompt=(source_prompt if spec.source_prompt != "none" and source_prompt is not None else None),
            seed=int(seed),
            steps=int(steps),
            progress=True,
            **knobs,
        )
        labels = [caption for caption, _ in result.tiles]
        strip = _show(torch.cat([t for _, t in result.tiles]), labels, nrow=len(labels))
        changed = (
            ""
            if mask is None
            else f"; region to change: {float(1 - mask.mean() if spec.mask_keeps == 'white' else mask.mean()):.0%} of the image"
        )
        return strip, f"{spec.title}: " + " | ".join(labels) + changed
    except Exception as e:  # noqa: BLE001
        return None, _error(e)


def _knob_order() -> list[tuple[str, object]]:
    """(method, knob) for every knob of every method: the order of the edit tab's knob widgets."""
    return [(name, k) for name, spec in EDIT_METHODS.items() for k in spec.knobs]


def _knob_kwargs(method: str, values) -> dict:
    out = {}
    for (name, knob), v in zip(_knob_order(), values):
        if name != method or v is None or v == "":
            continue
        out[knob.name] = int(v) if knob.type is int else (float(v) if knob.type is float else v)
    return out


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _knob_widget(gr, knob):
    label = f"{knob.name} — {knob.help}"
    if knob.choices is not None:
        return gr.Dropdown(list(knob.choices), value=knob.default, label=label)
    if knob.type is str:  # free text (a token, a list of numbers, a prompt)
        return gr.Textbox(value=knob.default or "", label=label)
    if knob.type is float and knob.lo is not None and knob.hi is not None:
        return gr.Slider(knob.lo, knob.hi, value=knob.default, label=label, step=0.01)
    return gr.Number(value=knob.default, label=label, precision=0 if knob.type is int else None)


def _model_inputs(gr):
    names = list(MODEL_CHOICES)
    default = "digits-unet-s" if "digits-unet-s" in names else (names[0] if names else None)
    with gr.Row():
        model = gr.Dropdown(names, value=default, label="zoo model")
        run = gr.Textbox(label="or a run folder (overrides the zoo model)", placeholder="runs/my_run")
    return model, run


def build_app():
    """The Gradio Blocks app (not launched). Gradio's usage analytics are off (nothing leaves the machine)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    tracked = gr.Progress(track_tqdm=True)  # the samplers' tqdm bars, shown in the page

    def sample_tab(model, run, sampler, steps, guidance, seed, prompt, n, progress=tracked):
        return sample_images(model, run, sampler, steps, guidance, seed, prompt, n)

    def compare_tab(model, run, samplers, steps, guidance, seed, prompt, n, progress=tracked):
        return compare_samplers(model, run, samplers, steps, guidance, seed, prompt, n)

    def edit_tab(*values, progress=tracked):
        return edit_image(*values)

    with gr.Blocks(title="difflab") as app:
        gr.Markdown("# difflab\nSample, edit and compare samplers with the model zoo or your own run folders.")
        with gr.Tab("Sample"):
            model, run = _model_inputs(gr)
            with gr.Row():
                sampler = gr.Dropdown(sorted(SAMPLERS), value=DEFAULT_SAMPLER, label="sampler")
                steps = gr.Slider(1, 100, value=10, step=1, label="steps")
                guidance = gr.Slider(0, 8, value=1.0, step=0.1, label="guidance scale (1 = none)")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="seed")
                n = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
                prompt = gr.Textbox(label="prompt (text models) or class name/index (class models)")
            go = gr.Button("Generate", variant="primary", elem_id="sample-button")
            out = gr.Image(label="samples", type="pil", elem_id="sample-output")
            status = gr.Markdown(elem_id="sample-status")
            go.click(sample_tab, [model, run, sampler, steps, guidance, seed, prompt, n], [out, status])

        with gr.Tab("Edit"):
            e_model, e_run = _model_inputs(gr)
            names = list(EDIT_METHODS)
            method = gr.Dropdown(names, value="repaint", label="method")
            gr.Markdown(
                "Upload an image and **paint the region to change** (white brush); or upload a black-and-white "
                "mask of the image's size. The image is centre-cropped and resized to the model's size."
            )
            with gr.Row():
                editor = gr.ImageEditor(
                    label="image (paint the region to change)",
                    type="numpy",
                    brush=gr.Brush(colors=["#ffffff"], default_size=24),
                    elem_id="edit-editor",
                )
                mask_file = gr.Image(label="or a mask file (white = change)", type="numpy", elem_id="edit-mask")
            with gr.Row():
                e_prompt = gr.Textbox(label="prompt (the edit; text or class)")
                e_source = gr.Textbox(label="source prompt (what the input shows)")
                e_steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                e_seed = gr.Number(value=0, precision=0, label="seed")
            knob_widgets, groups = [], {}
            for name, spec in EDIT_METHODS.items():
                with gr.Group(visible=name == "repaint") as group:
                    gr.Markdown(f"**{spec.title}.** {spec.summary} (Here the painted region is what changes.)")
                    for knob in spec.knobs:
                        knob_widgets.append(_knob_widget(gr, knob))
                groups[name] = group
            method.change(lambda m: [gr.update(visible=m == k) for k in groups], [method], list(groups.values()))
            e_go = gr.Button("Edit", variant="primary", elem_id="edit-button")
            e_out = gr.Image(label="input | mask | output", type="pil", elem_id="edit-output")
            e_status = gr.Markdown(elem_id="edit-status")
            e_go.click(
                edit_tab,
                [e_model, e_run, method, editor, mask_file, e_prompt, e_source, e_steps, e_seed, *knob_widgets],
                [e_out, e_status],
            )

        with gr.Tab("Compare samplers"):
            c_model, c_run = _model_inputs(gr)
            samplers = gr.CheckboxGroup(
                sorted(SAMPLERS), value=[DEFAULT_SAMPLER, "euler", "dpmpp_2m"], label="samplers (same noise)"
            )
            with gr.Row():
                c_steps = gr.Slider(1, 100, value=6, step=1, label="steps")
                c_guidance = gr.Slider(0, 8, value=1.0, step=0.1, label="guidance scale")
                c_seed = gr.Number(value=0, precision=0, label="seed")
                c_n = gr.Slider(1, 16, value=4, step=1, label="images per sampler")
                c_prompt = gr.Textbox(label="prompt or class")
            c_go = gr.Button("Compare", variant="primary", elem_id="compare-button")
            c_out = gr.Image(label="one row per sampler", type="pil", elem_id="compare-output")
            c_status = gr.Markdown(elem_id="compare-status")
            c_go.click(
                compare_tab,
                [c_model, c_run, samplers, c_steps, c_guidance, c_seed, c_prompt, c_n],
                [c_out, c_status],
            )
    return app


def _cmd_ui(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("difflab ui: error: needs gradio: pip install 'difflab[ui]' (make demo installs it)", file=sys.stderr)
        return 2
    from difflab.pipeline import resolve_device, resolve_dtype

    PLACEMENT.update(device=str(resolve_device(args.device)), dtype=args.dtype, low_memory=args.low_memory)
    resolve_dtype(args.dtype)
    app = build_app()
    print(
        f"difflab ui on http://{args.host}:{args.port}, models on {PLACEMENT['device']} in {args.dtype} (Ctrl-C stops it)"
    )
    app.queue().launch(server_name=args.host, server_port=args.port, inbrowser=False, quiet=True)
    return 0


def add_ui_parser(subparsers) -> argparse.ArgumentParser:
    u = subparsers.add_parser(
        "ui", help="a browser app on localhost: sample, edit, compare samplers", description=__doc__.split("\n\n")[0]
    )
    u.add_argument("--port", type=POS_INT, default=7860, help="port (default 7860)")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    add_device_arguments(u)
    add_memory_argument(u)
    u.set_defaults(func=_cmd_ui)
    return u
