import math

import pytest
import torch

from difflab.core import EDM, GaussianMixture, Preconditioned, sigmas_karras
from difflab.data import load_dataset
from difflab.methods.adm import classifier_log_prob, sample_ancestral_guided
from difflab.nn.classifier import ClassifierConfig, NoisyClassifier, load_classifier, save_classifier
from difflab.train.classifier import train_classifier


def _bayes_log_prob(marginal):
    def log_prob(x, sigma, class_labels):
        lj = marginal._log_joint(x, sigma)
        return (lj - torch.logsumexp(lj, 1, keepdim=True)).gather(1, class_labels[:, None])[:, 0]

    return log_prob


def test_ancestral_classifier_guidance_with_bayes_classifier_samples_the_class():
    # ADM Alg. 1 with s = 1 and the exact classifier on an unconditional mixture denoiser must
    # sample the class-conditional component (up to the discretisation of the ancestral chain).
    mus = torch.tensor([[-1.0, 0.5], [1.5, -1.0]], dtype=torch.float64)
    v = torch.tensor([[0.3, 0.4], [0.5, 0.2]], dtype=torch.float64) ** 2
    marginal = GaussianMixture(torch.tensor([0.7, 0.3]), mus, v)
    n = 8000
    y = torch.ones(n, dtype=torch.long)  # ask for the rarer class
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 40
    out = sample_ancestral_guided(
        lambda x, s, class_labels: marginal.denoiser(x, s),
        x,
        sigmas_karras(200, 0.002, 40.0),
        _bayes_log_prob(marginal),
        1.0,
        cond={"class_labels": y},
        noise=torch.Generator().manual_seed(1),
    )
    se = v[1].sqrt() / math.sqrt(n)
    assert ((out.mean(0) - mus[1]).abs() < 5 * se + 0.02).all(), out.mean(0)
    torch.testing.assert_close(out.std(0), v[1].sqrt(), rtol=0.08, atol=0)
    # scale 0 is plain ancestral sampling of the marginal: the rare class stays rare
    out0 = sample_ancestral_guided(
        lambda x, s, class_labels: marginal.denoiser(x, s),
        x,
        sigmas_karras(50, 0.002, 40.0),
        _bayes_log_prob(marginal),
        0.0,
        cond={"class_labels": y},
        noise=torch.Generator().manual_seed(1),
    )
    share = (marginal.responsibilities(out0, 0.0).argmax(1) == 1).double().mean().item()
    assert abs(share - 0.3) < 0.03


def test_noisy_classifier_learns_digits_and_round_trips(tmp_path):
    data = load_dataset("digits", "train")
    D = Preconditioned(torch.nn.Identity(), EDM(), "edm")
    cfg = ClassifierConfig(
        image_size=16, in_channels=1, num_classes=10, channels=16, channel_mult=(1, 2), attention_resolutions=(8,)
    )
    clf, info = train_classifier(data, D, steps=150, batch_size=64, lr=2e-3, config=cfg, progress=False)
    test = load_dataset("digits", "test")
    sigma = torch.full((len(test.images),), 0.1, dtype=torch.float64)
    x = test.images + 0.1 * torch.randn(test.images.shape, generator=torch.Generator().manual_seed(0))
    _, _, c_in, c_noise = D.coeffs_for(x, sigma)
    acc = (clf(c_in * x, c_noise).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
    save_classifier(clf, tmp_path / "clf", info)
    again = load_classifier(tmp_path / "clf")
    torch.testing.assert_close(again(c_in[:4] * x[:4], c_noise[:4]), clf(c_in[:4] * x[:4], c_noise[:4]))
    lp = classifier_log_prob(again, D)(x[:4], sigma[:4], class_labels=test.labels[:4])
    assert lp.shape == (4,) and (lp <= 0).all()
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_classifier(tmp_path / "clf")


def test_classifier_input_errors():
    clf = NoisyClassifier(
        ClassifierConfig(image_size=16, in_channels=1, channels=8, channel_mult=(1, 2), attention_resolutions=())
    )
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        clf(torch.zeros(2, 3, 16, 16), 0.0)
    with pytest.raises(ValueError, match="built for 16x16"):
        clf(torch.zeros(2, 1, 8, 8), 0.0)
    out = clf(torch.zeros(2, 1, 16, 16), torch.zeros(2), all_heads=True)
    assert out["class"].shape == (2, 10)
