"""Validation loss and perplexity of a whole model on Megatron indexed datasets, through training's own
evaluation (full model, the mean per-token loss of eval_iters batches)."""
from __future__ import annotations

import math
import os

from megatron_est.data.builder import build_train_valid_test_datasets
from megatron_est.parallel.state import SINGLE
from megatron_est.training.batches import MicroBatches
from megatron_est.training.evaluate import evaluate


def validation_loss(model, prefix: str, seq_length: int, eval_iters: int, batch_size: int, seed: int,
                    cache_dir: str, vocab_size: int) -> dict:
    """{"loss", "perplexity", "tokens"} over eval_iters batches of batch_size samples drawn from every document
    of the dataset `prefix` (sample order: the dataset's own shuffle with `seed`)."""
    n = eval_iters * batch_size
    ds = build_train_valid_test_datasets(prefix, "0,1,0", seq_length, seed, (0, n, 0),
                                         os.path.join(cache_dir, "index"), vocab_size=vocab_size)[1]
    loss = evaluate(model, MicroBatches(ds, batch_size, batch_size, 1, 0), eval_iters, SINGLE)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n * seq_length}
