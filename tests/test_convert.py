"""tools/convert_checkpoint.py: merge/split TP x PP shards, export to and import from Hugging Face folders."""
import dataclasses
import glob
import os

import pytest
import torch

from megatron_est.config import Config, ConfigError, ParallelConfig
from megatron_est.convert import checkpoint as conv
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState
from tests.engine_harness import make_cfg, run_plain, with_checkpoint
from tests.helpers import tiny, token_batch
from tools import convert_checkpoint as tool

transformers = pytest.importorskip("transformers")
FAMILIES = ("gpt2", "llama")


def _layout(model_cfg, tp, pp) -> Config:
    return Config(model=model_cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                           pipeline_model_parallel_size=pp))


def _trained_like(model: LanguageModel, seed: int = 0) -> LanguageModel:
    """Perturb every weight so that nothing equals its initial value (a stand-in for a trained model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_sharded_models_and_merge_inverts_it(family):
    cfg = _layout(tiny(family, num_layers=4), 2, 2)
    full = LanguageModel(cfg.model, seed=5).state_dict()
    shards = conv.split_state_dict(full, cfg)
    ranges = conv.stage_layer_ranges(cfg)
    for (t, p), (local, info) in shards.items():
        st = ParallelState(world_size=4, rank=p * 2 + t, tp=2, pp=2)
        ref = LanguageModel(cfg.model, st, seed=5, layer_range=ranges[p], pre_process=p == 0,
                            post_process=p == 1).state_dict()
        assert set(local) == set(ref), (t, p)
        for name in ref:  # layout-independent init: shard (t, p) of the full model is the (t, p) model
            assert torch.equal(local[name], ref[name]), (t, p, name)
    merged = conv.merge_shards(shards, 2, 2)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_tp2_pp2_checkpoint_gives_our_logits_in_transformers(family, tmp_path):
    model_cfg = tiny(family, num_layers=4)
    ours = _trained_like(LanguageModel(model_cfg, seed=8)).eval()
    conv.write_weights_checkpoint(str(tmp_path / "ckpt"), _layout(model_cfg, 2, 2), ours.state_dict())
    rc = tool.main(["export-hf", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                    "--no-tokenizer"])  # tokenizers: tests/test_hf_export.py
    assert rc == 0
    files = sorted(os.listdir(tmp_path / "hf"))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    ids, _ = token_batch(model_cfg, batch=2)
    with torch.no_grad():
        expect = ours(ids)
    torch.testing.assert_close(_hf_logits(str(tmp_path / "hf"), ids), expect, rtol=1e-4, atol=1e-4)


def _hf_folder(family, path, tie=False):
    cfg = tiny(family)
    if family == "gpt2":
        conf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=64, n_layer=2, n_head=8, n_positions=32,
                                       activation_function="gelu_new")
        model = transformers.GPT2LMHeadModel(conf)
    else:
        conf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=32, rope_theta=5000.0, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(conf)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("family,tie", [("gpt2", True), ("llama", False), ("llama", True)])
def test_import_then_export_is_lossless(family, tie, tmp_path):
    from safetensors.torch import load_file

    _hf_folder(family, tmp_path / "orig", tie)
    assert tool.main(["import-hf", "--hf-dir", str(tmp_path / "orig"), "--save", str(tmp_path / "ckpt"),
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--make-vocab-size-divisible-by", "64"]) == 0
    from megatron_est.training import checkpoint_manifest

    it_dir = glob.glob(str(tmp_path / "ckpt" / "iter_*"))[0]  # written like a training save: verified on --load
    assert checkpoint_manifest.verify(it_dir) == ("ok", None)
    assert tool.main(["export-hf", "--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back")]) == 0
    orig = load_file(str(tmp_path / "orig" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(orig)
    for k in orig:
        assert torch.equal(back[k], orig[k]), k


def test_training_starts_from_an_imported_model(tmp_path):
    """The first step's loss of a run that --loads an imported folder is transformers' loss on that batch."""
    hf = _hf_folder("llama", tmp_path / "orig")
    # No vocabulary padding here: padded logits (zero rows) take part in our loss, as in Megatron.
    conv.import_hf(str(tmp_path / "orig"), str(tmp_path / "ckpt"), make_vocab_size_divisible_by=50)
    cfg = with_checkpoint(make_cfg("llama", iters=1, schedule="none", num_layers=2, max_position_embeddings=32,
                                   rotary_base=5000.0, make_vocab_size_divisible_by=50),
                          load=str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="--norm-epsilon 1e-06, this run 1e-05"):
        run_plain(cfg, ParallelState())
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_epsilon=1e-6))
    result = run_plain(cfg, ParallelState())
    assert result["start"] == 0 and result["end"] == 1
    from tests.engine_harness import dataset

    tokens = torch.stack([dataset(cfg)[i]["tokens"] for i in range(8)])
    with torch.no_grad():
        logits = hf(tokens[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(result["losses"][1] - float(ref)) < 1e-5


def test_bad_inputs_are_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert tool.main(["import-hf", "--hf-dir", str(tmp_path / "empty"), "--save", str(tmp_path / "c")]) == 2
    assert "no config.json" in capsys.readouterr().err
    conv.write_weights_checkpoint(str(tmp_path / "ck"), _layout(tiny("gpt2"), 1, 1),
                                  LanguageModel(tiny("gpt2"), seed=1).state_dict())
    assert tool.main(["export-hf", "--load", str(tmp_path / "ck"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]  # nothing overwritten
    (tmp_path / "tok.model").write_bytes(b"not really a sentencepiece model")
    assert tool.main(["export-hf", "--load", str(tmp_path / "ck"), "--output", str(tmp_path / "new"),
                      "--tokenizer-model", str(tmp_path / "tok.model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a sentencepiece model" in err and not os.path.exists(tmp_path / "new")
    with pytest.raises(ConfigError, match="already exists"):
        conv.write_weights_checkpoint(str(tmp_path / "ck"), _layout(tiny("gpt2"), 1, 1), {})
