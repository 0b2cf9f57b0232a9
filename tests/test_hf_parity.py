"""With weights copied across, our full models produce transformers' logits (and import/export round-trips)."""
import pytest
import torch

from megatron_est.convert.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from megatron_est.model.language_model import LanguageModel
from tests.helpers import tiny, token_batch

transformers = pytest.importorskip("transformers")


def _hf_model(cfg):
    conf = hf_config_dict(cfg)
    kind = conf.pop("model_type")
    conf.pop("architectures")
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**conf))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_match_transformers(family):
    cfg = tiny(family)
    ours = LanguageModel(cfg, seed=7).eval()
    hf = _hf_model(cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    ids, _ = token_batch(cfg, batch=3)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (3, cfg.seq_length, cfg.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_export_round_trip_is_lossless(family):
    cfg = tiny(family)
    sd = LanguageModel(cfg, seed=3).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        if k == "embedding.weight" or k == "output_layer.weight":  # padded rows are not exported
            assert torch.equal(back[k][: cfg.vocab_size], sd[k][: cfg.vocab_size])
        else:
            assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_matches_transformers_despite_vocab_padding(family):
    """Padded vocabulary rows (250 -> 256 here) take no probability mass, so the loss is the HF model's."""
    cfg = tiny(family)
    assert cfg.padded_vocab_size > cfg.vocab_size
    ours = LanguageModel(cfg, seed=7).eval()
    hf = _hf_model(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    with torch.no_grad():
        for p in ours.embedding.weight[cfg.vocab_size:]:
            p.normal_()  # whatever the padding rows hold must not matter
    ids, labels = token_batch(cfg, batch=2)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(ids).logits.flatten(0, 1), labels.flatten())
        got = ours(ids, labels).mean()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
