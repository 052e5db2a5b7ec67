import torch

from difflab.core import GaussianMixture, sigmas_karras
from difflab.methods.diffedit import diffedit, diffedit_mask


def _text_oracle():
    """'Text'-conditional Gaussian data on 8x8 images: query and reference differ in one block."""
    mu_ref = torch.zeros(1, 8, 8, dtype=torch.float64)
    mu_q = mu_ref.clone()
    mu_q[:, 2:5, 3:7] = 1.5  # the object the query text adds/changes
    block = (mu_q != mu_ref).double()
    gms = {0: GaussianMixture.gaussian(mu_ref.flatten(), 0.2), 1: GaussianMixture.gaussian(mu_q.flatten(), 0.2)}

    def D(x, sigma, text):
        out = torch.empty_like(x)
        for k, gm in gms.items():
            sel = text == k
            if sel.any():
                out[sel] = gm.denoiser(x[sel], sigma[sel])
        return out

    return D, gms, block, mu_q


def test_diffedit_mask_finds_the_changed_region_and_edit_stays_inside():
    D, gms, block, mu_q = _text_oracle()
    img = gms[0].sample(4, torch.Generator().manual_seed(0))[0].reshape(4, 1, 8, 8)
    q, r = {"text": torch.ones(1, dtype=torch.long)}, {"text": torch.zeros(1, dtype=torch.long)}
    mask = diffedit_mask(D, img, q, r, sigma=1.0, generator=torch.Generator().manual_seed(1))
    inter = (mask * block).sum((1, 2, 3))
    union = ((mask + block) > 0).double().sum((1, 2, 3))
    assert (inter / union > 0.9).all(), inter / union
    out = diffedit(D, img, mask, sigmas_karras(30, 0.002, 20.0), q, r, strength=0.7)
    torch.testing.assert_close(out * (1 - mask), img * (1 - mask), rtol=0, atol=0)  # background kept exactly
    inside = (out * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))
    assert (inside > 1.0).all(), inside  # the block now follows the query (mean 1.5; reference 0)


def test_diffedit_mask_clamp_keeps_a_weaker_region_that_min_max_drops():
    """The paper removes extreme values before rescaling: with a strong and a weak changed block,
    clipping at 3x the mean keeps both; min-max rescaling lets the strong one hide the weak one."""
    strong, weak = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    strong[..., 2:5, 2:5] = 1
    weak[..., 9:14, 8:14] = 1

    def D(x, sigma, text):  # the prediction differs by 4 in the strong block and by 1 in the weak one
        return x * 0 + text.view(-1, 1, 1, 1).to(x.dtype) * (4 * strong + weak)

    img = torch.zeros(1, 1, 16, 16)
    q, r = {"text": torch.ones(1)}, {"text": torch.zeros(1)}
    clipped = diffedit_mask(D, img, q, r, sigma=1.0, n_draws=1)
    minmax = diffedit_mask(D, img, q, r, sigma=1.0, n_draws=1, clamp=None)
    torch.testing.assert_close(clipped, ((strong + weak) > 0).float())
    torch.testing.assert_close(minmax, strong)
    try:
        diffedit_mask(D, img, q, r, sigma=1.0, clamp=0.0)
    except ValueError as e:
        assert "clamp" in str(e)
    else:
        raise AssertionError("clamp=0 accepted")
