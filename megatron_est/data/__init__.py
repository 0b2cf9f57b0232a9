"""Data pipeline: tokenizers, Megatron indexed datasets (.bin/.idx), GPT sample indices, blending.

The main entry points are re-exported lazily, so importing a submodule (as preprocessing workers do) stays
cheap and does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "DataError": "errors",
    "build_tokenizer": "tokenizers",
    "train_sentencepiece": "tokenizers",
    "shakespeare_files": "corpus",
    "wikipedia_articles": "corpus",
    "prepare_default_corpus": "default_corpus",
    "build_train_valid_test_datasets": "builder",
    "IndexedDataset": "indexed_dataset",
    "preprocess": "preprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
