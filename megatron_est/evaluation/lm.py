"""An lm_eval LM around our own LanguageModel: batched log-likelihoods of (context, continuation) requests.

It subclasses lm-eval's TemplateLM, so the context/continuation split into tokens (trailing spaces moved to the
continuation, the end-of-document token as context when there is none) is lm-eval's own, exactly as its
Hugging Face model does it; only the scoring of token lists is ours. Works on one process, and on every rank of
a tensor-parallel group (each rank scores every request; the logits are gathered over the shards). Pipeline
stages cannot score alone: tools/evaluate.py merges any TP x PP checkpoint into one process first.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_est.model.language_model import LanguageModel


class MegatronLM(TemplateLM):
    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16,
                 max_length: Optional[int] = None, autocast: Optional[Callable] = None,
                 show_progress: bool = True):
        """model: a LanguageModel holding every layer (or a DeepSpeed engine around one); tokenizer: ours
        (data/tokenizers.py: .encode, .eod). autocast: a context-manager factory (the run's mixed precision)."""
        super().__init__()
        self.model = getattr(model, "module", model)  # DeepSpeed's engine wraps the module
        if not isinstance(self.model, LanguageModel) or not (self.model.pre_process and self.model.post_process):
            raise ValueError("MegatronLM needs the whole model on this process (no pipeline stage alone)")
        self.tok, self.batch_size = tokenizer, batch_size
        self.max_length = max_length or self.model.cfg.max_position_embeddings
        self.autocast = autocast or contextlib.nullcontext
        self.show_progress = show_progress

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # our tokenizers add no BOS, as the training data has none

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token), all greedy) per (key, context ids, continuation ids). The input is
        the last max_length tokens of context + continuation minus the final one, as lm-eval's HF model
        truncates; longest first, so a batch pads little."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood (megatron_est)",
                   disable=disable_tqdm or not self.show_progress)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, result in zip(idx, self._score_batch([requests[i] for i in idx])):
                out[i] = result
            bar.update(len(idx))
        bar.close()
        return out

    @torch.no_grad()
    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
        width = max(len(x) for x in inputs)
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)  # right padding: causal, unseen
        for row, x in enumerate(inputs):
            ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        with self.autocast():
            logits = self.model(ids)
        self.model.train(was_training)
        logp = torch.log_softmax(logits.float(), dim=-1)
        results = []
        for row, ((_, _, cont), x) in enumerate(zip(batch, inputs)):
            # A continuation longer than the window (a long PIQA solution under a small vocabulary) is scored
            # on the tokens the window predicts, its last max_length; lm-eval's HF model does not handle it.
            n = min(len(cont), len(x))
            rows = logp[row, len(x) - n:len(x)]
            target = torch.tensor(cont[len(cont) - n:], dtype=torch.long, device=device)
            total = rows.gather(-1, target[:, None]).sum()
            results.append((float(total), bool((rows.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over disjoint windows of max_length tokens (lm-eval's windowing)."""
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("generation tasks are not supported: the tasks here are log-likelihood ones")
