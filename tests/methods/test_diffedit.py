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
