"""The memory switches (`Pipeline.enable_low_memory`, `--low-memory`): attention in query slices, VAE
decoding in slices (tiled for diffusers VAEs), the text encoder kept on the CPU. Each leaves the
images unchanged; the slicing really reaches the attention kernels."""

import pytest
import torch
import torch.nn.functional as F

from difflab import zoo
from difflab.cli import main
from difflab.core.attention import attention, attention_slicing


@pytest.mark.parametrize("mask_kind", [None, "keys", "full"])
def test_sliced_attention_equals_the_whole(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (37, 11, 11))
    mask = None
    if mask_kind == "keys":
        mask = torch.rand(2, 11, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "full":
        mask = torch.rand(2, 1, 37, 11, generator=g) > 0.3
        mask[..., 0] = True
    whole = attention(q, k, v, mask=mask)
    with attention_slicing(8):
        sliced = attention(q, k, v, mask=mask)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positive number of queries"):
        with attention_slicing(0):
            pass


def test_low_memory_text_latent_pipeline_gives_the_same_images(monkeypatch):
    pipe = zoo.load("shapes-text-ldm")
    kw = dict(prompt=["a red circle", "a blue square", "a green star"], steps=3, guidance_scale=3.0, seed=1)
    want = pipe(3, **kw)
    switched = pipe.enable_low_memory(attention_slice=16, vae_slice=1)
    assert switched == {"attention_slice": 16, "vae_slice": 1, "vae_tiling": False, "offload_text_encoder": True}
    lengths, decoded = [], []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *a, **k):
        lengths.append(q.shape[-2])
        return sdpa(q, *a, **k)

    decode = pipe.latent_space.decode
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(pipe.latent_space, "decode", lambda z: decoded.append(len(z)) or decode(z))
    got = pipe(3, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert lengths and max(lengths) <= 16 and decoded == [1, 1, 1]  # the switches reached the kernels
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"


def test_low_memory_on_a_diffusers_folder_tiles_its_vae(tmp_path):
    pytest.importorskip("diffusers")
    from difflab.pipeline import Pipeline
    from tests.interop.test_diffusers_folder import tiny_sd_folder

    pipe = Pipeline.from_pretrained(tiny_sd_folder(tmp_path))
    want = pipe(2, prompt="a cat", steps=3, guidance_scale=2.0, seed=0)
    assert pipe.enable_low_memory(attention_slice=8)["vae_tiling"] is True
    assert pipe.latent_space.autoencoder.use_tiling
    torch.testing.assert_close(pipe(2, prompt="a cat", steps=3, guidance_scale=2.0, seed=0), want, rtol=0, atol=1e-5)


def test_the_low_memory_flag(tmp_path):
    out = tmp_path / "grid.png"
    run = str(zoo.ZOO_DIR / "digits-unet-s")
    assert main(["sample", "--run", run, "--n", "2", "--steps", "2", "--low-memory", "--out", str(out)]) == 0
    assert out.is_file()
