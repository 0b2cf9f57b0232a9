"""Downstream evaluation offline: our lm_eval wrapper's per-request log-likelihoods equal a direct computation
with our model and lm-eval's own Hugging Face model on the export; tools/evaluate.py end to end and bad input."""
import json
import os

import numpy as np
import pytest
import torch

from megatron_est.config import Config, ConfigError, ParallelConfig
from megatron_est.convert import checkpoint as conv
from megatron_est.data.indexed_dataset import write_indexed_dataset
from megatron_est.data.tokenizers import GPT2BPETokenizer, gpt2_files
from megatron_est.evaluation.harness import run_tasks
from megatron_est.evaluation.lm import MegatronLM
from megatron_est.evaluation.load import load_checkpoint
from megatron_est.evaluation.tasks import parse_tasks
from megatron_est.model.language_model import LanguageModel
from tests.helpers import tiny
from tools import evaluate as tool

pytest.importorskip("lm_eval")
# Multiple choice (contexts shared across choices), partial contexts (WinoGrande), LAMBADA (greedy flag).
TASKS, LIMIT = ["arc_easy", "winogrande", "lambada"], 3


def _gpt2_model():
    """A 2-layer GPT-2 on the real GPT-2 BPE vocabulary, weights moved off their initial values."""
    cfg = tiny("gpt2", vocab_size=50257, hidden_size=32, num_attention_heads=4, seq_length=128,
               make_vocab_size_divisible_by=128)
    model = LanguageModel(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint saved at TP=2 x PP=2, its Hugging Face export, the original model, our tokenizer)."""
    root = tmp_path_factory.mktemp("eval")
    model = _gpt2_model()
    layout = Config(model=model.cfg, parallel=ParallelConfig(tensor_model_parallel_size=2,
                                                             pipeline_model_parallel_size=2))
    conv.write_weights_checkpoint(str(root / "ckpt"), layout, model.state_dict())
    vocab, merges = gpt2_files()
    hf = conv.export_hf(str(root / "ckpt"), str(root / "hf"), None, None,
                        {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges})
    return str(root / "ckpt"), hf, model, GPT2BPETokenizer(vocab, merges)


def _per_request(results) -> dict:
    """(task, doc, context, continuation) -> (log-likelihood, is_greedy) from lm-eval's logged samples."""
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for args, resp in zip(s["arguments"], s["resps"]):
                out[(task, s["doc_id"], args[0], args[1])] = (float(resp[0][0]), bool(resp[0][1]))
    return out


def _direct(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) by hand: one forward of the whole text, summed log-softmax."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    assert whole[:len(ctx)] == ctx  # the tasks' contexts end on a token boundary
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_wrapper_equals_direct_computation_and_lm_eval_hf_model(exported):
    from lm_eval.models.huggingface import HFLM

    ckpt, hf, original, tok = exported
    merged, _ = load_checkpoint(ckpt)  # the TP=2 x PP=2 shards merged into one process
    ours = _per_request(run_tasks(MegatronLM(merged, tok, batch_size=4, show_progress=False), TASKS, LIMIT,
                                  log_samples=True))
    theirs = _per_request(run_tasks(HFLM(pretrained=hf, batch_size=4, device="cpu"), TASKS, LIMIT,
                                    log_samples=True))
    assert set(ours) == set(theirs) and len(ours) >= 3 * LIMIT * 2
    for key, (ll, greedy) in ours.items():
        assert ll == pytest.approx(theirs[key][0], abs=1e-4), key
        assert greedy == theirs[key][1], key
        assert ll == pytest.approx(_direct(original, tok, key[2], key[3]), abs=1e-4), key
    assert len({round(v[0], 3) for v in ours.values()}) > len(ours) // 2  # not a constant


def test_batching_and_truncation_do_not_change_log_likelihoods(exported):
    _, _, model, tok = exported
    long_ctx = " ".join(["the king is dead"] * 60)  # beyond the 128 positions: truncated on the left
    reqs = [(("a", "b"), tok.encode("Question: what is it?"), tok.encode(" a crown")),
            (("c", "d"), tok.encode(long_ctx), tok.encode(" long live the king")),
            (("e", "f"), tok.encode("Hello"), tok.encode(" world"))]
    one = [MegatronLM(model, tok, batch_size=1, show_progress=False)._loglikelihood_tokens([r])[0] for r in reqs]
    batched = MegatronLM(model, tok, batch_size=3, show_progress=False)._loglikelihood_tokens(reqs)
    for (a, ga), (b, gb) in zip(one, batched):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    whole = (reqs[1][1] + reqs[1][2])[-129:]  # the last 128 inputs predict the continuation
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    n = len(reqs[1][2])
    expect = sum(float(logp[len(whole) - 1 - n + i, whole[len(whole) - n + i]]) for i in range(n))
    assert one[1][0] == pytest.approx(expect, abs=1e-4)
    # A continuation longer than the window: its last 128 tokens, all predicted inside the window.
    cont = tok.encode(long_ctx)[:200]
    whole = (tok.encode("Hi") + cont)[-129:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    expect = sum(float(logp[i, whole[i + 1]]) for i in range(128))
    got = MegatronLM(model, tok, show_progress=False)._loglikelihood_tokens([(None, tok.encode("Hi"), cont)])[0][0]
    assert got == pytest.approx(expect, abs=1e-4)


def _valid_prefix(tmp_path) -> str:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50257, size=int(n)).tolist() for n in rng.integers(50, 400, size=12)]
    return write_indexed_dataset(str(tmp_path / "valid_text_document"), docs, np.uint16)


def _direct_ce(model, prefix, cache) -> float:
    """Mean cross-entropy by hand over the first 4 samples the tool draws (seed 1234, 128 tokens)."""
    from megatron_est.data.builder import build_train_valid_test_datasets

    ds = build_train_valid_test_datasets(prefix, "0,1,0", 128, 1234, (0, 4, 0), cache, vocab_size=50257)[1]
    tokens = torch.stack([ds[i]["tokens"] for i in range(4)])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 50257).double(),
                                                       tokens[:, 1:].reshape(-1)))


def test_tool_random_init_is_the_fresh_model(exported, tmp_path):
    ckpt = exported[0]
    prefix, vocab, merges = _valid_prefix(tmp_path), *gpt2_files()
    out = tool.run(tool._parser().parse_args([
        "--load", ckpt, "--random-init", "7", "--tasks", "none", "--data-path", prefix, "--eval-iters", "2",
        "--micro-batch-size", "2", "--data-cache-dir", str(tmp_path / "c"), "--vocab-file", vocab,
        "--merge-file", merges, "--tokenizer-type", "GPT2BPETokenizer"]))
    fresh = LanguageModel(exported[2].cfg, seed=7).eval()
    assert out["validation"][prefix]["loss"] == pytest.approx(_direct_ce(fresh, prefix, str(tmp_path / "c" / "index")),
                                                              abs=1e-4)


def test_tool_validation_loss_and_tasks_to_json(exported, tmp_path):
    ckpt, _, model, tok = exported
    prefix = _valid_prefix(tmp_path)
    out = tmp_path / "eval.json"
    vocab, merges = gpt2_files()  # a weights-only checkpoint names no tokenizer: give it
    assert tool.main(["--load", ckpt, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                      "--merge-file", merges, "--data-path", prefix, "--eval-iters", "2", "--micro-batch-size", "2",
                      "--data-cache-dir", str(tmp_path / "cache"), "--tasks", "arc_easy", "--limit", "2",
                      "--batch-size", "4", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["task"] for r in res["tasks"]] == ["arc_easy"] and res["tasks"][0]["n"] == 2
    ce = _direct_ce(model, prefix, str(tmp_path / "cache" / "index"))  # the same samples, by hand
    v = res["validation"][prefix]
    assert v["loss"] == pytest.approx(ce, abs=1e-4)
    assert v["perplexity"] == pytest.approx(np.exp(ce), rel=1e-4)


@pytest.mark.parametrize("argv,needle", [
    (["--load", "/no/such/ckpt"], "--load /no/such/ckpt: no such directory"),
    (["--hf-dir", "/tmp", "--tasks", "arc_easy,bogus"], "--tasks: unknown task 'bogus'"),
    (["--hf-dir", "/tmp", "--limit", "0"], "--limit must be >= 1"),
    (["--hf-dir", "/tmp", "--backend", "hf", "--random-init", "1"], "--random-init needs --backend ours"),
])
def test_tool_refuses_bad_input_in_one_line(argv, needle, capsys):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_parse_tasks():
    assert parse_tasks("all")[0] == "arc_easy" and len(parse_tasks("all")) == 8
    with pytest.raises(ConfigError, match="--eval-tasks"):
        parse_tasks("", "--eval-tasks")


def test_result_rows_give_closed_form_standard_errors():
    from megatron_est.evaluation.harness import format_table, result_rows

    res = {"results": {"piqa": {"acc,none": 0.6, "acc_stderr,none": "N/A"}}, "n-samples": {"piqa": {"effective": 10}}}
    rows = result_rows(res)
    assert rows[0]["acc_stderr"] == pytest.approx((0.6 * 0.4 / 9) ** 0.5)
    assert "| piqa | 10 | 0.6000 ± 0.1633 | - | - | 0.5 |" in format_table(rows)


class _Ids:
    """A stand-in tokenizer: the scoring below starts from token ids; only the end-of-document id is read."""
    eod = 0


def _tp_scores(rank, world, family):
    from megatron_est.parallel.state import ParallelState, build_groups

    st = build_groups(ParallelState(world, rank, tp=world, pp=1, dp=1))
    return _score_ids(LanguageModel(tiny(family, seq_length=32), st, seed=4).eval())


def _score_ids(model):
    g = torch.Generator().manual_seed(1)
    reqs = [(None, torch.randint(1, 250, (n,), generator=g).tolist(), torch.randint(1, 250, (m,), generator=g).tolist())
            for n, m in ((5, 3), (30, 6), (12, 1), (40, 2))]  # the last one is cut to the 32-token window
    return MegatronLM(model, _Ids(), batch_size=3, show_progress=False)._loglikelihood_tokens(reqs)


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_tensor_parallel_ranks_score_like_one_process(family):
    """Under TP=2 (gloo) every rank scores the requests itself; it gets the one-process figures."""
    from tests.helpers import run_distributed

    one = _score_ids(LanguageModel(tiny(family, seq_length=32), seed=4).eval())
    for rank_scores in run_distributed(_tp_scores, 2, family):
        for (a, ga), (b, gb) in zip(rank_scores, one):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
