"""Merge and split checkpoint shards, and move weights between our checkpoints and Hugging Face folders.

A checkpoint shard holds its rank's local tensors with local layer indices; its "parallel" entry records the
global layer range and, per parameter, the dimension along which tensor-parallel shards concatenate
(`partition_dim`). Merging concatenates along those dimensions and renumbers layers; splitting builds each
shard's module on the meta device to learn its names and partition dimensions, then slices.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
from typing import Optional

import torch

from megatron_est.config import Config, ConfigError, ModelConfig, ParallelConfig
from megatron_est.convert.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from megatron_est.parallel.state import ParallelState
from megatron_est.training import checkpoint_layout as layout, checkpoint_manifest as manifest, checkpointing as ckpt

_LAYER_PREFIX = "decoder.layers."


# ------------------------------------------------------------------------------------------ layer names
def _to_global(name: str, first: int) -> str:
    if not name.startswith(_LAYER_PREFIX):
        return name
    local, rest = name[len(_LAYER_PREFIX):].split(".", 1)
    return f"{_LAYER_PREFIX}{first + int(local)}.{rest}"


def _to_local(name: str, first: int) -> str:
    return _to_global(name, -first)


def stage_layer_ranges(cfg: Config) -> list[tuple[int, int]]:
    """Layer range of each pipeline stage, as training builds them."""
    try:
        from megatron_est.parallel.partition import stage_ranges
    except ImportError:
        stage_ranges = None
    if stage_ranges is not None:
        return [tuple(r) for r in stage_ranges(cfg)]
    n, pp = cfg.model.num_layers, cfg.parallel.pipeline_model_parallel_size
    return [(i * n // pp, (i + 1) * n // pp) for i in range(pp)]


# ---------------------------------------------------------------------------------------------- merge
def resolve_iteration(root: str, iteration: Optional[int]) -> int:
    if iteration is not None:
        return iteration
    it = layout.read_latest_iteration(root)
    if it is None:
        raise ConfigError(f"--load {root}: no {layout.LATEST_FILE} (give --iteration)")
    return it


def merge_checkpoint(root: str, iteration: Optional[int] = None) -> tuple[ModelConfig, dict, dict]:
    """(model config, full fp32/original-dtype state dict with global names, metadata) of a checkpoint."""
    iteration = resolve_iteration(root, iteration)
    meta = layout.read_metadata(root, iteration)
    model_cfg = ModelConfig(**meta["model"])
    par = meta["parallel"]
    tp, pp = par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"]
    if meta.get("engine") == "deepspeed" and not meta.get("weights_only"):
        shards = _deepspeed_shards(root, iteration, tp, pp)
    else:
        shards = {}
        for p in range(pp):
            for t in range(tp):
                path = layout.shard_path(root, iteration, t, p, pp)
                if not os.path.isfile(path):
                    raise ConfigError(f"--load {root}: shard {path} is missing")
                payload = torch.load(path, map_location="cpu", weights_only=True)
                shards[(t, p)] = (payload["model"], payload["parallel"])
    return model_cfg, merge_shards(shards, tp, pp), meta


def merge_shards(shards: dict, tp: int, pp: int) -> dict:
    """shards[(tp_rank, pp_rank)] = (local state dict, parallel info) -> one full state dict."""
    full: dict = {}
    for p in range(pp):
        sd0, info0 = shards[(0, p)]
        first = info0["layer_range"][0]
        dims = info0.get("partition_dims", {})
        duplicates = set(info0.get("pipeline_duplicates", []))
        for name in sd0:
            gname = _to_global(name, first)
            if name in duplicates or (gname in full and not gname.startswith(_LAYER_PREFIX)):
                continue  # the last stage's copy of a tied embedding
            if name in dims and tp > 1:
                full[gname] = torch.cat([shards[(t, p)][0][name] for t in range(tp)], dim=dims[name])
            else:
                full[gname] = sd0[name]
    return full


def _deepspeed_shards(root: str, iteration: int, tp: int, pp: int) -> dict:
    """Module weights of a DeepSpeed checkpoint, per (tp, pp) rank (fp32 masters under ZeRO-3)."""
    from megatron_est.training.deepspeed_engine import read_deepspeed_module_states

    return read_deepspeed_module_states(root, iteration, tp, pp)


# ---------------------------------------------------------------------------------------------- split
def _shard_module(cfg: Config, tp_rank: int, pp_rank: int, ranges: list[tuple[int, int]]) -> torch.nn.Module:
    from megatron_est.model.language_model import LanguageModel

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    st = ParallelState(world_size=tp * pp, rank=pp_rank * tp + tp_rank, tp=tp, pp=pp, dp=1)
    with torch.device("meta"):
        return LanguageModel(cfg.model, st, seed=0, layer_range=ranges[pp_rank], pre_process=pp_rank == 0,
                             post_process=pp_rank == pp - 1)


def split_state_dict(full: dict, cfg: Config) -> dict:
    """One full state dict -> {(tp_rank, pp_rank): (local state dict, parallel info)} for cfg's layout."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ranges = stage_layer_ranges(cfg)
    out = {}
    for p in range(pp):
        for t in range(tp):
            module = _shard_module(cfg, t, p, ranges)
            first = ranges[p][0]
            local, dims, dups = {}, {}, []
            for name, param in module.named_parameters():
                src = full[_to_global(name, first)]
                dim = getattr(param, "partition_dim", None)
                if dim is not None:
                    dims[name] = int(dim)
                    src = src.chunk(tp, dim=dim)[t]
                if getattr(param, "pipeline_duplicate", False):
                    dups.append(name)
                if tuple(src.shape) != tuple(param.shape):
                    raise ConfigError(f"weight {name}: shape {tuple(src.shape)} does not fit {tuple(param.shape)}")
                local[name] = src.clone().contiguous()
            info = {"tp": tp, "pp": pp, "dp": 1, "tp_rank": t, "pp_rank": p, "layer_range": list(ranges[p]),
                    "partition_dims": dims, "pipeline_duplicates": dups}
            out[(t, p)] = (local, info)
    return out


def write_weights_checkpoint(root: str, cfg: Config, full: dict, iteration: int = 0, source: str = "",
                             data_args: Optional[dict] = None) -> str:
    """A weights-only checkpoint (no optimizer, no RNG) in cfg's TP/PP layout; training can --load it.

    data_args: the data flags of the run the weights come from (its tokenizer), kept in the metadata for export.

    Written like a training save: a temporary directory renamed into place, then the latest pointer.
    """
    name = layout.iter_dir_name(iteration)
    tmp, final = os.path.join(root, ".tmp." + name), os.path.join(root, name)
    if os.path.exists(final):
        raise ConfigError(f"--save {root}: {name} already exists (refusing to overwrite)")
    shards = split_state_dict(full, cfg)
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    pp = cfg.parallel.pipeline_model_parallel_size
    for (t, p), (local, info) in shards.items():
        shard_dir = os.path.join(tmp, layout.shard_dir_name(t, p, pp))
        os.makedirs(shard_dir)
        ckpt._save_file({"checkpoint_version": layout.CHECKPOINT_VERSION, "format": "megatron_est",
                         "iteration": iteration, "model": local, "parallel": info, "args": layout.config_dict(cfg)},
                        os.path.join(shard_dir, layout.SHARD_FILE))
    par = dataclasses.asdict(cfg.parallel)
    par.pop("distributed_backend", None)
    par["data_parallel_size"] = None
    meta = {"format": "megatron_est", "checkpoint_version": layout.CHECKPOINT_VERSION, "engine": "torch",
            "weights_only": True, "iteration": iteration, "consumed_samples": 0, "global_batch_size": None,
            "model": dataclasses.asdict(cfg.model), "parallel": par, "source": source}
    if data_args:
        meta["args"] = {"data": data_args}
    ckpt.write_text_atomic(os.path.join(tmp, layout.METADATA_FILE), json.dumps(meta, indent=1))
    # last inside it, as a training save does: --load verifies it (and does not say "unverified")
    ckpt.write_text_atomic(os.path.join(tmp, manifest.MANIFEST_FILE),
                           manifest.manifest_text(manifest.hash_files(tmp), layout.next_save_seq(root)))
    os.replace(tmp, final)
    ckpt.write_text_atomic(os.path.join(root, layout.LATEST_FILE), str(iteration))
    return final


# ---------------------------------------------------------------------------------------- Hugging Face
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def saved_args(root: str, iteration: int, meta: dict) -> Optional[dict]:
    """The flags a checkpoint was trained with: in its metadata, or in rank 0's shard (plain or DeepSpeed)."""
    if meta.get("args") is not None or meta.get("weights_only"):
        return meta.get("args")
    pp = meta["parallel"]["pipeline_model_parallel_size"]
    deepspeed = meta.get("engine") == "deepspeed"
    path = (layout.est_state_path if deepspeed else layout.shard_path)(root, iteration, 0, 0, pp)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("args")


def export_hf(root: str, out_dir: str, iteration: Optional[int] = None, dtype: Optional[str] = None,
              tokenizer_files: Optional[dict] = None, with_tokenizer: bool = True) -> str:
    """Write a folder that transformers' Auto classes load and generate from: config.json, model.safetensors,
    generation_config.json and the tokenizer the checkpoint trained with (tokenizer.json, plus the original
    files), every file readable by all (0644). tokenizer_files: flags that override the saved ones."""
    from safetensors.torch import save_file

    from megatron_est.convert import hf_tokenizer

    iteration = resolve_iteration(root, iteration)
    model_cfg, full, meta = merge_checkpoint(root, iteration)
    tok, why = None, "--no-tokenizer"
    if with_tokenizer:
        tok, why = hf_tokenizer.resolve_tokenizer(saved_args(root, iteration, meta), model_cfg.vocab_size,
                                                  tokenizer_files or {})
    hf = to_hf_state_dict({k: v.float() for k, v in full.items()}, model_cfg)
    if model_cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # transformers ties it to the input embedding
    target = _DTYPES[dtype] if dtype else torch.float32
    hf = {k: v.to(target).contiguous().clone() for k, v in hf.items()}
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--output {out_dir}: directory exists and is not empty (refusing to overwrite)")
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    # Without a tokenizer the ids are unknown: null, so that no model-type default (GPT-2's 50256) is assumed.
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok is not None:
        ids = hf_tokenizer.write_hf_tokenizer(out_dir, tok, model_cfg.max_position_embeddings)
        _copy_original_files(tok, out_dir)
    else:
        print(f"note: no tokenizer exported ({why}); give --tokenizer-model, or --tokenizer-type GPT2BPETokenizer "
              "[--vocab-file --merge-file]", file=sys.stderr)
    conf = {**hf_config_dict(model_cfg), **ids, "dtype": _DTYPE_NAMES[target], "torch_dtype": _DTYPE_NAMES[target]}
    _write_json(os.path.join(out_dir, "config.json"), conf)
    _write_json(os.path.join(out_dir, "generation_config.json"), {**ids, "_from_model_config": False})
    for name in os.listdir(out_dir):  # safetensors writes its file 0600; an export is meant to be shared
        os.chmod(os.path.join(out_dir, name), 0o644)
    return out_dir


def _copy_original_files(tok, out_dir: str) -> None:
    """The sentencepiece model / GPT-2 vocab and merges as well: what --tokenizer-model or --vocab-file take."""
    if hasattr(tok, "model_file"):
        shutil.copyfile(tok.model_file, os.path.join(out_dir, "tokenizer.model"))
    else:
        shutil.copyfile(tok.vocab_file, os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(tok.merge_file, os.path.join(out_dir, "merges.txt"))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def model_config_from_hf(conf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig for a transformers GPT-2 or Llama config.json (refusing what we cannot represent)."""
    kind = conf.get("model_type")
    pad = dict(make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    if kind == "gpt2":
        if conf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"GPT-2 activation {conf['activation_function']!r} is not supported (gelu_new only)")
        n_pos = conf.get("n_positions", 1024)
        return ModelConfig(family="gpt2", num_layers=conf["n_layer"], hidden_size=conf["n_embd"],
                           num_attention_heads=conf["n_head"], ffn_hidden_size=conf.get("n_inner"),
                           vocab_size=conf["vocab_size"], seq_length=n_pos, max_position_embeddings=n_pos,
                           norm_epsilon=conf.get("layer_norm_epsilon", 1e-5), **pad)
    if kind == "llama":
        if conf.get("rope_scaling") or (conf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ConfigError("Llama RoPE scaling is not supported")
        if conf.get("attention_bias") or conf.get("mlp_bias") or conf.get("hidden_act", "silu") != "silu":
            raise ConfigError("Llama with attention/MLP biases or a non-SiLU activation is not supported")
        heads = conf["num_attention_heads"]
        if conf.get("head_dim") not in (None, conf["hidden_size"] // heads):
            raise ConfigError(f"Llama head_dim {conf['head_dim']} != hidden_size / num_attention_heads")
        theta = conf.get("rope_theta") or (conf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        n_pos = conf.get("max_position_embeddings", 2048)
        return ModelConfig(family="llama", num_layers=conf["num_hidden_layers"], hidden_size=conf["hidden_size"],
                           num_attention_heads=heads,
                           num_query_groups=conf.get("num_key_value_heads") or heads,
                           ffn_hidden_size=conf["intermediate_size"], vocab_size=conf["vocab_size"],
                           seq_length=n_pos, max_position_embeddings=n_pos,
                           norm_epsilon=conf.get("rms_norm_eps", 1e-6), rotary_base=float(theta),
                           tie_embeddings=bool(conf.get("tie_word_embeddings", False)), **pad)
    raise ConfigError(f"model_type {kind!r} is not supported (gpt2 or llama)")


def read_hf_folder(hf_dir: str) -> tuple[dict, dict]:
    """(config.json as a dict, all weights) of a Hugging Face folder (safetensors, or pytorch_model*.bin)."""
    conf_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(conf_path):
        raise ConfigError(f"--hf-dir {hf_dir}: no config.json")
    with open(conf_path) as f:
        conf = json.load(f)
    weights: dict = {}
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        for path in files:
            weights.update(load_file(path))
    else:
        files = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
        if not files:
            raise ConfigError(f"--hf-dir {hf_dir}: no *.safetensors or pytorch_model*.bin weights")
        for path in files:
            weights.update(torch.load(path, map_location="cpu", weights_only=True))
    if conf.get("model_type") == "gpt2" and "wte.weight" in weights:  # OpenAI's original files: no prefix
        weights = {("transformer." + k if not k.startswith("lm_head.") else k): v for k, v in weights.items()}
    return conf, weights


def import_hf(hf_dir: str, save_root: str, tp: int = 1, pp: int = 1, make_vocab_size_divisible_by: int = 128,
              dtype: Optional[str] = None) -> tuple[Config, str]:
    """A weights-only checkpoint at iteration 0 from a Hugging Face folder, sharded for TP x PP."""
    conf, hf = read_hf_folder(hf_dir)
    model_cfg = model_config_from_hf(conf, make_vocab_size_divisible_by)
    if model_cfg.family == "gpt2" and "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["transformer.wte.weight"]
    if model_cfg.family == "llama" and model_cfg.tie_embeddings:
        hf.setdefault("lm_head.weight", hf["model.embed_tokens.weight"])
    full = from_hf_state_dict(hf, model_cfg)
    full = {k: (v.to(_DTYPES[dtype]) if dtype else v.float()) for k, v in full.items()}
    cfg = Config(model=model_cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                          pipeline_model_parallel_size=pp))
    from megatron_est.validation import validate

    validate(cfg, tp * pp)
    return cfg, write_weights_checkpoint(save_root, cfg, full, 0, source=os.path.abspath(hf_dir))


def reshard(root: str, save_root: str, tp: int, pp: int, iteration: Optional[int] = None) -> str:
    """Merge a checkpoint's shards and split them for another TP x PP layout (weights only)."""
    iteration = resolve_iteration(root, iteration)
    model_cfg, full, meta = merge_checkpoint(root, iteration)
    cfg = Config(model=model_cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                          pipeline_model_parallel_size=pp))
    from megatron_est.validation import validate

    validate(cfg, tp * pp)
    data = (saved_args(root, iteration, meta) or {}).get("data")
    return write_weights_checkpoint(save_root, cfg, full, 0, source=os.path.abspath(root), data_args=data)
