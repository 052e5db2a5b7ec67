import pytest
import torch

from difflab.core import GaussianMixture
from difflab.methods.sdg import content_score, language_score, sdg, style_score
from difflab.nn.clip import SmallCLIP, SmallCLIPConfig


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return SmallCLIP(
        SmallCLIPConfig(
            vocab=["a", "red", "blue", "circle", "square"], image_size=8, channels=8, dim=16, text_dim=16, text_depth=1
        )
    ).eval()


def test_scores_are_bounded_and_self_similarity_is_maximal(clip):
    x = torch.randn(3, 3, 8, 8)
    s = language_score(clip, "a red circle")(x, torch.full((3,), 0.5))
    assert s.shape == (3,) and (s.abs() <= 1 + 1e-5).all()
    tiny = torch.full((3,), 1e-4)
    same = content_score(clip, x[:1], torch.Generator().manual_seed(0))(x[:1].expand(3, -1, -1, -1), tiny)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-3, rtol=0)
    st = style_score(clip, x[:1], torch.Generator().manual_seed(0))(x[:1].expand(3, -1, -1, -1), tiny)
    assert st.abs().max() < 1e-4
    other = style_score(clip, x[1:2], torch.Generator().manual_seed(0))(x[:1], tiny[:1])
    assert other.item() < st.min().item()


def test_sdg_gradient_ascends_the_score(clip):
    # the guided denoiser moves x0_hat along +grad F(x, sigma): a small step that way raises F
    gm = GaussianMixture.gaussian(torch.zeros(3 * 8 * 8), 0.5)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((4,), 0.3)
    F = language_score(clip, "a blue square")
    base = gm.denoiser(x, sigma)
    torch.testing.assert_close(sdg(gm.denoiser, F, 0.0)(x, sigma), base)
    direction = sdg(gm.denoiser, F, 1.0)(x, sigma) - base  # = sigma^2 grad F
    assert (F(x + 1e-2 * direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1), sigma) > F(x, sigma)).all()
