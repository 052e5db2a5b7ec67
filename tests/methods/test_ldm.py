import pytest
import torch

from difflab.data import load_dataset
from difflab.nn.autoencoder import LatentSpace, load_latent_space, save_latent_space, scale_factor
from difflab.train.autoencoder import train_autoencoder
from difflab.nn.autoencoder import AutoencoderConfig, AutoencoderKL


def test_smoke_autoencoder_shapes_for_factors():
    for f in (1, 2, 4, 8):
        ae = AutoencoderKL(AutoencoderConfig(in_channels=3, image_size=32, factor=f, channels=8))
        x = torch.randn(2, 3, 32, 32)
        post = ae.encode(x)
        assert post.mean.shape == (2, 4, 32 // f, 32 // f) == (2, *ae.latent_shape)
        assert ae.decode(post.sample()).shape == x.shape
        assert (post.kl() >= 0).all()


def test_autoencoder_round_trip_and_stored_scale(tmp_path):
    # round trip on the training batch (capacity and plumbing; generalisation is papers/ldm's job)
    data = load_dataset("shapes", "train", n=32, size=16)
    cfg = AutoencoderConfig(in_channels=3, image_size=16, factor=4, z_channels=4, channels=8)
    ae, info = train_autoencoder(data.images, cfg, steps=120, batch_size=32, lr=3e-3, progress=False)
    test = data.images
    rec = ae.decode(ae.encode(test).mode())
    err = (rec - test).abs().mean().item()
    baseline = (test - test.mean(0)).abs().mean().item()  # predicting the mean image
    assert err < 0.5 * baseline, (err, baseline)  # measured 0.34 vs 0.76 after 120 steps
    space = LatentSpace(ae, scale_factor(ae, data.images))
    z = space.encode(data.images)
    assert abs(z.std().item() - 1.0) < 1e-4  # unit variance by construction
    save_latent_space(space, tmp_path / "ae", info)
    again = load_latent_space(tmp_path / "ae")
    assert again.scale == space.scale
    torch.testing.assert_close(again.decode(again.encode(test[:4])), space.decode(space.encode(test[:4])))


def test_autoencoder_errors():
    with pytest.raises(ValueError, match="power of 2"):
        AutoencoderConfig(factor=3)
    ae = AutoencoderKL(AutoencoderConfig(in_channels=1, image_size=16, factor=4, channels=8))
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        ae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latent scale factor must be positive"):
        LatentSpace(ae, 0.0)
