"""Shared fixtures for the data-pipeline tests: one sentencepiece model per session, trained on Shakespeare."""

import pytest
import torch

from megatron_est.data.corpus import shakespeare_files
from megatron_est.data.tokenizers import build_tokenizer, gpt2_files, train_sentencepiece

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(shakespeare_files(), str(tmp_path_factory.mktemp("spm") / "shakespeare8k"), 8192)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model):
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    vocab, merges = gpt2_files()
    return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
