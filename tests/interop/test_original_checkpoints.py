"""Original checkpoints into difflab's networks, checked against small reference forwards written here
from the papers' released code's semantics (not difflab's): guided-diffusion's UNet (ResBlocks with
scale-shift norm and BigGAN up/down, AttentionBlock with the legacy and the new qkv head layout) and
DiT (timm attention, adaLN-Zero). State dicts in the original key layout, random weights, saved as
files and read with weights_only."""

import math

import pytest
import torch
import torch.nn.functional as F

from difflab.interop.original import adm_unet, dit_network, read_state_dict
from difflab.pipeline import Pipeline

# ---------------------------------------------------------------------------------------------
# guided-diffusion, as its unet.py computes
# ---------------------------------------------------------------------------------------------


def _emb(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _gn(x, s, p):
    return F.group_norm(x.float(), 32, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-5)


class ADM:
    """channels 32, channel_mult (1, 2), 1 res block, attention at side 8 (of 16) and in the middle,
    resblock_updown, scale-shift norm, class-conditional; learn_sigma (6 output channels)."""

    def __init__(self, order):
        self.order, self.s = order, {}
        g = torch.Generator().manual_seed(0)

        def p(name, *shape, scale=0.1):
            self.s[name] = torch.randn(*shape, generator=g) * scale

        def norm(name, c):
            p(f"{name}.weight", c)
            self.s[f"{name}.weight"] += 1
            p(f"{name}.bias", c)

        def res(name, cin, cout):
            norm(f"{name}.in_layers.0", cin)
            p(f"{name}.in_layers.2.weight", cout, cin, 3, 3)
            p(f"{name}.in_layers.2.bias", cout)
            p(f"{name}.emb_layers.1.weight", 2 * cout, 128)
            p(f"{name}.emb_layers.1.bias", 2 * cout)
            norm(f"{name}.out_layers.0", cout)
            p(f"{name}.out_layers.3.weight", cout, cout, 3, 3)
            p(f"{name}.out_layers.3.bias", cout)
            if cin != cout:
                p(f"{name}.skip_connection.weight", cout, cin, 1, 1)
                p(f"{name}.skip_connection.bias", cout)

        def attn(name, c):
            norm(f"{name}.norm", c)
            p(f"{name}.qkv.weight", 3 * c, c, 1)
            p(f"{name}.qkv.bias", 3 * c)
            p(f"{name}.proj_out.weight", c, c, 1)
            p(f"{name}.proj_out.bias", c)

        p("time_embed.0.weight", 128, 32)
        p("time_embed.0.bias", 128)
        p("time_embed.2.weight", 128, 128)
        p("time_embed.2.bias", 128)
        p("label_emb.weight", 5, 128, scale=1.0)
        p("input_blocks.0.0.weight", 32, 3, 3, 3)
        p("input_blocks.0.0.bias", 32)
        res("input_blocks.1.0", 32, 32)
        res("input_blocks.2.0", 32, 32)  # the down-sampling resblock
        res("input_blocks.3.0", 32, 64)
        attn("input_blocks.3.1", 64)
        res("middle_block.0", 64, 64)
        attn("middle_block.1", 64)
        res("middle_block.2", 64, 64)
        res("output_blocks.0.0", 128, 64)
        attn("output_blocks.0.1", 64)
        res("output_blocks.1.0", 64 + 32, 64)
        attn("output_blocks.1.1", 64)
        res("output_blocks.1.2", 64, 64)  # the up-sampling resblock
        res("output_blocks.2.0", 64 + 32, 32)
        res("output_blocks.3.0", 32 + 32, 32)
        norm("out.0", 32)
        p("out.2.weight", 6, 32, 3, 3)
        p("out.2.bias", 6)

    def res(self, x, emb, name, updown=None):
        s = self.s
        h = F.silu(_gn(x, s, f"{name}.in_layers.0"))
        if updown == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        if updown == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        h = F.conv2d(h, s[f"{name}.in_layers.2.weight"], s[f"{name}.in_layers.2.bias"], padding=1)
        e = F.linear(F.silu(emb), s[f"{name}.emb_layers.1.weight"], s[f"{name}.emb_layers.1.bias"])[..., None, None]
        scale, shift = e.chunk(2, dim=1)
        h = _gn(h, s, f"{name}.out_layers.0") * (1 + scale) + shift
        h = F.conv2d(F.silu(h), s[f"{name}.out_layers.3.weight"], s[f"{name}.out_layers.3.bias"], padding=1)
        if f"{name}.skip_connection.weight" in s:
            x = F.conv2d(x, s[f"{name}.skip_connection.weight"], s[f"{name}.skip_connection.bias"])
        return x + h

    def attn(self, x, name, heads):
        s = self.s
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = F.conv1d(_gn(flat, s, f"{name}.norm"), s[f"{name}.qkv.weight"], s[f"{name}.qkv.bias"])
        ch, t = c // heads, flat.shape[-1]
        if self.order == "legacy":  # QKVAttentionLegacy
            q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
        else:  # QKVAttention
            q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
        h = F.conv1d(a, s[f"{name}.proj_out.weight"], s[f"{name}.proj_out.bias"])
        return (flat + h).reshape(b, c, hh, ww)

    def __call__(self, x, t, y):
        s = self.s
        emb = F.linear(_emb(t, 32), s["time_embed.0.weight"], s["time_embed.0.bias"])
        emb = F.linear(F.silu(emb), s["time_embed.2.weight"], s["time_embed.2.bias"]) + s["label_emb.weight"][y]
        hs = [F.conv2d(x, s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"], padding=1)]
        hs.append(self.res(hs[-1], emb, "input_blocks.1.0"))
        hs.append(self.res(hs[-1], emb, "input_blocks.2.0", "down"))
        hs.append(self.attn(self.res(hs[-1], emb, "input_blocks.3.0"), "input_blocks.3.1", 2))
        h = self.res(hs[-1], emb, "middle_block.0")
        h = self.res(self.attn(h, "middle_block.1", 2), emb, "middle_block.2")
        h = self.attn(self.res(torch.cat([h, hs.pop()], 1), emb, "output_blocks.0.0"), "output_blocks.0.1", 2)
        h = self.attn(self.res(torch.cat([h, hs.pop()], 1), emb, "output_blocks.1.0"), "output_blocks.1.1", 2)
        h = self.res(h, emb, "output_blocks.1.2", "up")
        h = self.res(torch.cat([h, hs.pop()], 1), emb, "output_blocks.2.0")
        h = self.res(torch.cat([h, hs.pop()], 1), emb, "output_blocks.3.0")
        return F.conv2d(F.silu(_gn(h, s, "out.0")), s["out.2.weight"], s["out.2.bias"], padding=1)


ADM_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="8")
ADM_FLAGS.update(num_head_channels=32, learn_sigma=True, class_cond=True, resblock_updown=True)


@pytest.mark.parametrize("order", ["legacy", "new"])
def test_a_guided_diffusion_state_dict_computes_what_adm_computes(tmp_path, order):
    ref = ADM(order)
    path = tmp_path / "adm.pt"
    torch.save(ref.s, path)
    net = adm_unet(read_state_dict(path), use_new_attention_order=order == "new", **ADM_FLAGS)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([10.0, 900.0]), torch.tensor([1, 4])
    want = ref(x, t, y)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(net(x, t, class_labels=y), want, rtol=1e-4, atol=1e-4)
    if order == "legacy":  # the other layout reads the same file into different heads: not equal
        other = adm_unet(read_state_dict(path), use_new_attention_order=True, **ADM_FLAGS)
        assert (other(x, t, class_labels=y) - want).abs().max() > 1e-3


def test_an_adm_pipeline_samples_and_refuses_classifier_free_guidance(tmp_path):
    path = tmp_path / "adm.pt"
    torch.save({"module." + k: v for k, v in ADM("legacy").s.items()}, path)  # DataParallel names too
    pipe = Pipeline.from_original(path, "adm", **ADM_FLAGS)
    assert pipe.denoiser.learned_variance and pipe.num_classes == 5 and pipe.denoiser.schedule.T == 1000
    x = pipe(2, class_labels=[0, 3], steps=3, sampler="euler", seed=0)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="no null class"):
        pipe(1, class_labels=0, steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="does not fit these flags"):
        Pipeline.from_original(path, "adm", **{**ADM_FLAGS, "num_res_blocks": 2})


# ---------------------------------------------------------------------------------------------
# DiT, as its models.py computes
# ---------------------------------------------------------------------------------------------


def _dit_pos(dim, grid):
    """DiT's get_2d_sincos_pos_embed: meshgrid(w, h), the first half from the w coordinate, sin then cos."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gw, gh = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="xy"
    )
    return torch.cat([one(dim // 2, gw), one(dim // 2, gh)], dim=1).float()[None]


def _dit_state(hidden=64, depth=2, heads=2, patch=2, grid=4, cin=4, classes=10):
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    s = {"x_embedder.proj.weight": r(hidden, cin, patch, patch), "x_embedder.proj.bias": r(hidden)}
    s["pos_embed"] = _dit_pos(hidden, grid)
    s.update({"t_embedder.mlp.0.weight": r(hidden, 256), "t_embedder.mlp.0.bias": r(hidden)})
    s.update({"t_embedder.mlp.2.weight": r(hidden, hidden), "t_embedder.mlp.2.bias": r(hidden)})
    s["y_embedder.embedding_table.weight"] = r(classes + 1, hidden, scale=1.0)
    for b in range(depth):
        p = f"blocks.{b}"
        s.update({f"{p}.attn.qkv.weight": r(3 * hidden, hidden), f"{p}.attn.qkv.bias": r(3 * hidden)})
        s.update({f"{p}.attn.proj.weight": r(hidden, hidden), f"{p}.attn.proj.bias": r(hidden)})
        s.update({f"{p}.mlp.fc1.weight": r(4 * hidden, hidden), f"{p}.mlp.fc1.bias": r(4 * hidden)})
        s.update({f"{p}.mlp.fc2.weight": r(hidden, 4 * hidden), f"{p}.mlp.fc2.bias": r(hidden)})
        s.update(
            {f"{p}.adaLN_modulation.1.weight": r(6 * hidden, hidden), f"{p}.adaLN_modulation.1.bias": r(6 * hidden)}
        )
    s.update(
        {
            "final_layer.linear.weight": r(patch * patch * 2 * cin, hidden),
            "final_layer.linear.bias": r(patch * patch * 2 * cin),
        }
    )
    s.update({"final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden)})
    s["final_layer.adaLN_modulation.1.bias"] = r(2 * hidden)
    return s


def _dit_forward(s, x, t, y, heads=2, patch=2, depth=2):
    b, c, hgt, wid = x.shape
    tok = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    tok = tok + s["pos_embed"]
    d = tok.shape[-1]
    te = F.linear(_emb(t, 256), s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])
    c_ = F.linear(F.silu(te), s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    c_ = c_ + s["y_embedder.embedding_table.weight"][y]

    def mod(z, shift, scale):
        return F.layer_norm(z, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for i in range(depth):
        p = f"blocks.{i}"
        sm, cm, gm, sp, cp, gp = F.linear(
            F.silu(c_), s[f"{p}.adaLN_modulation.1.weight"], s[f"{p}.adaLN_modulation.1.bias"]
        ).chunk(6, 1)
        h = mod(tok, sm, cm)
        n = h.shape[1]
        qkv = F.linear(h, s[f"{p}.attn.qkv.weight"], s[f"{p}.attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's Attention
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(b, n, d), s[f"{p}.attn.proj.weight"], s[f"{p}.attn.proj.bias"])
        tok = tok + gm[:, None] * a
        h = F.gelu(F.linear(mod(tok, sp, cp), s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"]), approximate="tanh")
        tok = tok + gp[:, None] * F.linear(h, s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"])
    shift, scale = F.linear(
        F.silu(c_), s["final_layer.adaLN_modulation.1.weight"], s["final_layer.adaLN_modulation.1.bias"]
    ).chunk(2, 1)
    out = F.linear(mod(tok, shift, scale), s["final_layer.linear.weight"], s["final_layer.linear.bias"])
    gh, gw = hgt // patch, wid // patch
    out = out.reshape(b, gh, gw, patch, patch, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, gh * patch, gw * patch)


def test_a_dit_state_dict_computes_what_dit_computes(tmp_path):
    s = _dit_state()
    path = tmp_path / "dit.pt"
    torch.save({"ema": s}, path)  # DiT's training checkpoints nest the weights
    net = dit_network(read_state_dict(path), num_heads=2)
    assert net.config.learn_sigma and net.config.num_classes == 10 and net.config.input_size == 8
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([5.0, 500.0, 999.0]), torch.tensor([0, 9, 10])  # 10: the null class
    want = _dit_forward(s, x, t, y)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(net(x, t, class_labels=torch.tensor([0, 9, -1])), want, rtol=1e-4, atol=1e-4)


def test_a_dit_pipeline_guides_and_bad_files_are_named(tmp_path):
    s = _dit_state()
    path = tmp_path / "dit.pt"
    torch.save(s, path)
    pipe = Pipeline.from_original(path, "dit", num_heads=2)
    x = pipe(2, class_labels=[1, 2], steps=3, guidance_scale=4.0, seed=0)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="not a paper size: pass num_heads"):
        Pipeline.from_original(path, "dit")
    bad = dict(s, pos_embed=torch.zeros_like(s["pos_embed"]))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="pos_embed is not DiT's 2-D sin-cos grid"):
        Pipeline.from_original(tmp_path / "bad.pt", "dit", num_heads=2)
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # an object, not tensors
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
