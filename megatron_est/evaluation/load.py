"""Models and tokenizers to evaluate: any checkpoint of ours (any TP x PP, either engine: its shards merged into
one process) or a Hugging Face GPT-2 / Llama folder (mapped into our model), through convert/."""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_est.config import ConfigError, ModelConfig
from megatron_est.convert import checkpoint as conv
from megatron_est.convert.hf import from_hf_state_dict
from megatron_est.data.errors import DataError
from megatron_est.data.tokenizers import build_tokenizer
from megatron_est.model.language_model import LanguageModel
from megatron_est.training import checkpoint_layout as layout


def _model(model_cfg: ModelConfig, full: dict) -> LanguageModel:
    model = LanguageModel(model_cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in full.items()}, strict=False)
    if unexpected or missing:
        raise ConfigError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}")
    return model.eval()


def load_checkpoint(root: str, iteration: Optional[int] = None) -> tuple[LanguageModel, dict]:
    """(the whole model on this process, the checkpoint's metadata, with the training flags as "args")."""
    model_cfg, full, meta = conv.merge_checkpoint(root, iteration)
    if "args" not in meta:  # a training save keeps its flags in the shards
        pp = meta["parallel"]["pipeline_model_parallel_size"]
        shard = layout.shard_path(root, conv.resolve_iteration(root, iteration), 0, 0, pp)
        if os.path.isfile(shard):
            meta = {**meta, "args": torch.load(shard, map_location="cpu", weights_only=True).get("args")}
    return _model(model_cfg, full), meta


def load_hf_folder(hf_dir: str) -> LanguageModel:
    conf, hf = conv.read_hf_folder(hf_dir)
    model_cfg = conv.model_config_from_hf(conf)
    if "lm_head.weight" not in hf:  # tied: transformers leaves it out of the file
        hf["lm_head.weight"] = hf.get("transformer.wte.weight", hf.get("model.embed_tokens.weight"))
    return _model(model_cfg, from_hf_state_dict(hf, model_cfg))


def checkpoint_tokenizer(meta: dict, overrides: dict):
    """The tokenizer a checkpoint trained with (its saved data flags), each flag overridable."""
    data = dict((meta.get("args") or {}).get("data", {}))
    data.update({k: v for k, v in overrides.items() if v})
    kind = data.get("tokenizer_type") or "SentencePieceTokenizer"
    if kind == "SentencePieceTokenizer" and not data.get("tokenizer_model") and "data_path" in data \
            and not data["data_path"]:  # trained on the bundled corpus: its tokenizer (already built there)
        from megatron_est.data.default_corpus import prepare_default_corpus

        data["tokenizer_model"] = prepare_default_corpus(data.get("cache_dir") or ".cache")[1]
    return _tokenizer(kind, data)


def hf_folder_tokenizer(hf_dir: str, overrides: dict):
    """Our tokenizer on an exported folder's files: tokenizer.model, or vocab.json + merges.txt."""
    spm, vocab, merges = (os.path.join(hf_dir, n) for n in ("tokenizer.model", "vocab.json", "merges.txt"))
    given = {k: v for k, v in overrides.items() if v}
    if os.path.isfile(vocab) and os.path.isfile(merges):
        data = {"vocab_file": vocab, "merge_file": merges, **given}
        return _tokenizer(given.get("tokenizer_type", "GPT2BPETokenizer"), data)
    data = {"tokenizer_model": spm if os.path.isfile(spm) else None, **given}
    return _tokenizer(given.get("tokenizer_type", "SentencePieceTokenizer"), data)


def _tokenizer(kind: str, data: dict):
    try:
        return build_tokenizer(kind, data.get("tokenizer_model"), data.get("vocab_file"), data.get("merge_file"))
    except DataError as e:
        raise ConfigError(f"{e} (the tokenizer of the model to evaluate)") from None


