"""Typed configuration: one dataclass per concern, plus named presets. No global state.

Each field carries its command-line help, its --help group (Megatron's grouping) and, where one value alone can
be wrong, its range check (`check_fields`): arguments.py builds the parser from these, validation.py runs the
checks first, so the flag a user got wrong is the one an error names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional


class ConfigError(ValueError):
    """A bad flag or flag combination; the message is one line naming the flag."""


# ------------------------------------------------------------------------------------------- field checks
# A check takes the value and returns what is wrong with it ("must be >= 1"), or None. None values (a flag
# not given) are never checked.
Check = Callable[[object], Optional[str]]


def at_least(n: int) -> Check:
    return lambda v: None if v >= n else f"must be >= {n}"


def positive() -> Check:
    return lambda v: None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def non_negative() -> Check:
    return lambda v: None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def unit_interval() -> Check:  # Adam's betas: 1 would never forget, beyond it diverges
    return lambda v: None if 0 <= v < 1 else "must be in [0, 1)"


def one_of(*names) -> Check:
    return lambda v: None if v in names else f"unknown value {v!r} (choose from {', '.join(map(str, names))})"


def opt(default=None, help: str = "", group: str = "", *, check: Optional[Check] = None,
        default_text: Optional[str] = None, factory=None):
    """A config field with its --help text, --help group, range check and, where the default is derived
    (None: "follows --hidden-size"), the words --help shows for it."""
    md = {"help": help, "group": group, "check": check, "default_text": default_text}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


# --help groups, in the order --help prints them (Megatron's names where Megatron has the group).
GROUPS = ("network size", "initialization", "regularization", "training", "learning rate", "checkpointing",
          "mixed precision", "distributed", "validation", "data and dataloader", "logging", "EST", "DeepSpeed")
NET, INIT, REG, TRAIN, LR, CKPT, PREC, DIST, VAL, DATA, LOG, EST, DS = GROUPS


@dataclass
class ModelConfig:
    family: str = opt("gpt2", "model family: gpt2 (learned positions, LayerNorm, GELU, biases, tied embeddings) "
                      "or llama (RoPE, RMSNorm, SwiGLU, no biases, untied)", NET)  # checked in __post_init__
    num_layers: int = opt(4, "number of transformer layers", NET, check=at_least(1))
    hidden_size: int = opt(256, "transformer hidden size", NET, check=at_least(1))
    num_attention_heads: int = opt(4, "number of attention (query) heads", NET, check=at_least(1))
    num_query_groups: Optional[int] = opt(None, "key/value heads for grouped-query attention", NET,
                                          check=at_least(1), default_text="--num-attention-heads (multi-head)")
    ffn_hidden_size: Optional[int] = opt(None, "MLP intermediate size", NET, check=at_least(1),
                                         default_text="4 x --hidden-size")
    vocab_size: int = opt(8192, "vocabulary size (a run takes it from the tokenizer; padded below)", NET,
                          check=at_least(1))
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this (independent of the "
                                            "TP size, so every layout has the same shapes)", NET, check=at_least(1))
    seq_length: int = opt(256, "tokens per training sample", NET, check=at_least(1))
    max_position_embeddings: Optional[int] = opt(None, "position table size (learned positions)", NET,
                                                 check=at_least(1), default_text="--seq-length")
    norm_epsilon: float = opt(1e-5, "epsilon of LayerNorm / RMSNorm", NET, check=positive())
    rotary_base: float = opt(10000.0, "RoPE base (llama)", NET, check=positive())
    init_method_std: float = opt(0.02, "standard deviation of the normal weight initialisation", INIT,
                                 check=positive())
    # Derived from family unless given.
    normalization: Optional[str] = opt(None, "layernorm or rmsnorm", NET, check=one_of("layernorm", "rmsnorm"),
                                       default_text="from --model-family (gpt2: layernorm, llama: rmsnorm)")
    activation: Optional[str] = opt(None, "MLP activation: gelu or swiglu", NET, check=one_of("gelu", "swiglu"),
                                    default_text="from --model-family (gpt2: gelu, llama: swiglu)")
    position_embedding: Optional[str] = opt(None, "learned or rope", NET, check=one_of("learned", "rope"),
                                            default_text="from --model-family (gpt2: learned, llama: rope)")
    add_bias: Optional[bool] = opt(None, "biases in linear layers", NET,
                                   default_text="from --model-family (gpt2: on, llama: off)")
    tie_embeddings: Optional[bool] = opt(None, "share the input embedding with the LM head", NET,
                                         default_text="from --model-family (gpt2: on, llama: off)")

    def __post_init__(self) -> None:
        llama = self.family == "llama"
        if self.family not in ("gpt2", "llama"):
            raise ConfigError(f"--model-family: unknown family {self.family!r} (choose gpt2 or llama)")
        if self.normalization is None:
            self.normalization = "rmsnorm" if llama else "layernorm"
        if self.activation is None:
            self.activation = "swiglu" if llama else "gelu"
        if self.position_embedding is None:
            self.position_embedding = "rope" if llama else "learned"
        if self.add_bias is None:
            self.add_bias = not llama
        if self.tie_embeddings is None:
            self.tie_embeddings = not llama
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        # Padding depends only on make_vocab_size_divisible_by (not the TP size), so a TP=2 model has
        # exactly the TP=1 shapes and weights.
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "tensor-parallel size (ranks that split each layer)", DIST,
                                          check=at_least(1))
    pipeline_model_parallel_size: int = opt(1, "pipeline-parallel size (stages that split the layers)", DIST,
                                            check=at_least(1))
    data_parallel_size: int = opt(1, "derived from the world size at launch (not a flag)", DIST)
    decoder_first_pipeline_num_layers: Optional[int] = opt(
        None, "layers on the first pipeline stage (uneven pipeline; the rest split evenly)", DIST,
        check=at_least(1), default_text="an even share")
    decoder_last_pipeline_num_layers: Optional[int] = opt(
        None, "layers on the last pipeline stage (uneven pipeline; the rest split evenly)", DIST,
        check=at_least(1), default_text="an even share")
    pipeline_partition: str = opt("even", "how the layers split over pipeline stages: even (or as the two flags "
                                  "above say), or balanced: the first/last stage layer counts that even out the "
                                  "stages' FLOPs, the LM head on the last stage counted (--dry-run shows the split)",
                                  DIST, check=one_of("even", "balanced"))
    distributed_backend: Optional[str] = opt(None, "torch.distributed backend: nccl or gloo", DIST,
                                             check=one_of("nccl", "gloo"), default_text="nccl on GPU, gloo on CPU")
    world_size: Optional[int] = opt(None, "ranks of the plan, for --dry-run and the planning tools (no launcher "
                                    "there); a real run refuses a value other than the launcher's", DIST,
                                    check=at_least(1), default_text="the launcher's WORLD_SIZE")
    distributed_timeout_minutes: float = opt(
        10.0, "timeout of every collective, in minutes (Megatron's default); also how long ranks wait for rank 0 "
        "to build the data indices (raise it for slow checkpoint saves)", DIST, check=positive())


@dataclass
class ESTConfig:
    schedule: str = opt("default", "EST stages: a preset name (default, gpt2-paper, tinyllama-paper), 'none', or "
                        "'START:pH,pM,pL;...' (START an iteration or a percentage of --train-iters, e.g. "
                        "'0:0.5,0.5,0.5;300:0.5,0.5,1;600:1,1,1'); 'smooth:' before such points interpolates the "
                        "rates linearly between them every iteration, the last point's rates after it (e.g. "
                        "'smooth:0:0.5,0.5,0.5;600:1,1,1')", EST)
    layer_rescale: bool = opt(False, "scale active residual branches by N_L/k_L in layer-sampling stages", EST)
    stratified: bool = opt(True, "stratified sampling: keep the same number of units in every stratum "
                           "(--est-tp-strata, --est-pp-strata; with grouped queries, every KV group keeps the same "
                           "number of its query heads); off: one range per dimension whatever the strata", EST)
    # The strata are sampling parameters, never the layout: the same flags draw the same subnetworks at every
    # TP, PP and stage split (one algorithm). Strata that line up with the TP shards / pipeline stages also
    # balance their work; the dry run says when they do not and which values would (est/balance.py).
    tp_strata: int = opt(1, "sampling strata for heads and neurons (a divisor of both); a multiple of "
                         "--tensor-model-parallel-size gives every TP shard the same kept count", EST,
                         check=at_least(1))
    pp_strata: int = opt(1, "sampling strata for layers: equal ranges (a divisor of --num-layers); ranges that "
                         "line up with the pipeline stages give every stage the same share of its layers", EST,
                         check=at_least(1))
    seed: Optional[int] = opt(None, "seed of the subnetwork sampler", EST, default_text="--seed")
    # One default in every engine and layout (switching it is this one line); the study
    # (docs/reproduction.md) measured adamw better than freeze at 108 tokens per parameter on all of 3 seeds and at
    # 216 (1 seed), freeze better at 36 (3 seeds): pretraining is long, so adamw.
    unsampled_update: str = opt("adamw", "parameters outside the subnetwork: adamw (zero gradient, AdamW moves "
                                "them by momentum and weight decay) or freeze (untouched, AdamW moments too); the "
                                "same in every engine and layout", EST)
    keep_end_layers: bool = opt(False, "in layer-sampling stages always keep the first and the last layer; each "
                                "layer stratum still keeps round(p_L x its size) layers, the rest drawn among its "
                                "other layers", EST)
    lr_rewarm_iters: int = opt(0, "after each EST stage switch ramp the learning rate linearly back up over N "
                               "iterations: x (iterations since the switch + 1) / (N + 1), so x 1/(N+1) at the "
                               "switch and the schedule's own value from N iterations after it (0: off)", EST,
                               check=at_least(0))
    target_saving: Optional[float] = opt(
        None, "training-FLOPs saving to reach, e.g. 0.25: scales every --est-schedule stage start by one common "
        "factor so the saving (this model, sequence length and --train-iters) is within 0.5 percentage points "
        "of it", EST, default_text="the schedule as given")  # checked with the schedule (est/fit.py)


# Defaults that follow the run's length (issue 15): a short run still reaches its peak learning rate and is
# evaluated a few times. Runs of 300 iterations or more get exactly the old fixed values.
WARMUP_FRACTION, WARMUP_CAP = 0.1, 30
EVALS_PER_RUN, EVAL_INTERVAL_CAP = 3, 100


@dataclass
class TrainConfig:
    micro_batch_size: int = opt(8, "samples per micro-batch on each data-parallel rank", TRAIN, check=at_least(1))
    global_batch_size: Optional[int] = opt(None, "samples per optimizer step (all ranks, gradient accumulation "
                                           "included)", TRAIN, check=at_least(1),
                                           default_text="--micro-batch-size x data-parallel size")
    train_iters: int = opt(300, "optimizer steps to train", TRAIN, check=at_least(1))
    lr: float = opt(1e-3, "peak learning rate", LR, check=positive())
    min_lr: float = opt(1e-4, "learning rate at the end of the decay", LR, check=non_negative())
    lr_warmup_iters: Optional[int] = opt(None, "linear warmup steps", LR, check=at_least(0),
                                         default_text=f"{WARMUP_FRACTION:g} x --train-iters, at most {WARMUP_CAP}")
    lr_decay_iters: Optional[int] = opt(None, "steps over which the learning rate decays", LR, check=at_least(1),
                                        default_text="--train-iters")
    lr_decay_style: str = opt("cosine", "learning-rate decay: cosine, linear or constant", LR,
                              check=one_of("cosine", "linear", "constant"))
    weight_decay: float = opt(0.1, "AdamW weight decay (not on biases and norms)", REG, check=non_negative())
    adam_beta1: float = opt(0.9, "AdamW beta1", REG, check=unit_interval())
    adam_beta2: float = opt(0.95, "AdamW beta2", REG, check=unit_interval())
    adam_eps: float = opt(1e-8, "AdamW epsilon", REG, check=positive())
    clip_grad: float = opt(1.0, "clip the global gradient norm to this (0: no clipping)", REG,
                           check=non_negative())
    seed: int = opt(1234, "random seed (weights, data order, subnetworks)", TRAIN, check=at_least(0))
    log_interval: int = opt(10, "print and record a train line every N iterations", LOG, check=at_least(1))
    eval_interval: Optional[int] = opt(None, "evaluate the full model every N iterations (and at the end)", VAL,
                                       check=at_least(1), default_text=f"a third of --train-iters, at most "
                                       f"{EVAL_INTERVAL_CAP}")
    eval_iters: int = opt(10, "validation batches per evaluation", VAL, check=at_least(1))
    metrics_file: Optional[str] = opt(None, "write one JSON record per logged iteration and evaluation here", LOG)
    num_threads: Optional[int] = opt(None, "torch intra-op threads per rank on CPU (on a small shared machine one "
                                     "thread is often fastest)", TRAIN, check=at_least(1),
                                     default_text="torch's choice (all cores)")
    dry_run: bool = opt(False, "check the plan and print its parameters, FLOPs and memory per rank, then exit: no "
                        "data, no weights, no process group (--world-size N plans N ranks)", TRAIN)
    tensorboard_dir: Optional[str] = opt(None, "write TensorBoard event files here", LOG)
    wandb_project: Optional[str] = opt(None, "log to this W&B project when wandb is installed (offline unless "
                                       "WANDB_MODE says otherwise)", LOG)
    wandb_exp_name: Optional[str] = opt(None, "W&B run name", LOG)
    wandb_save_dir: Optional[str] = opt(None, "W&B files directory", LOG)
    eval_tasks: Optional[str] = opt(None, "zero-shot tasks at each evaluation, e.g. 'arc_easy,piqa' or 'all' "
                                    "(evaluation/tasks.py)", VAL)
    eval_limit: int = opt(100, "documents of each --eval-tasks task per evaluation", VAL, check=at_least(1))
    max_nonfinite_steps: int = opt(10, "a step whose loss or gradient norm is not finite is skipped (no update); "
                                   "stop the run after this many in a row", TRAIN, check=at_least(1))
    verbose: bool = opt(False, "let through third-party warnings that repeat every step or rank (filtered "
                        "once at start-up otherwise)", LOG)
    peak_tflops: Optional[float] = opt(None, "peak dense TFLOP/s of one device, for the model FLOPs utilisation "
                                       "(MFU) in the log", LOG, check=positive(),
                                       default_text="the GPU's bf16/fp16 peak when known, else no MFU")

    def __post_init__(self) -> None:
        given = {"lr_warmup_iters": self.lr_warmup_iters is not None, "eval_interval": self.eval_interval is not None}
        iters = self.train_iters if isinstance(self.train_iters, int) and self.train_iters > 0 else 0
        if self.lr_warmup_iters is None:
            self.lr_warmup_iters = min(WARMUP_CAP, int(WARMUP_FRACTION * iters))
        if self.eval_interval is None:
            self.eval_interval = max(1, min(EVAL_INTERVAL_CAP, iters // EVALS_PER_RUN))
        # Not a dataclass field (so not in checkpoints or replace()): which values the run chose, to log once.
        # Like ModelConfig's derived sizes, a filled-in value is kept by dataclasses.replace(train_iters=...):
        # build a new TrainConfig to re-derive it.
        self._scaled = tuple(k for k, v in given.items() if not v)

    def scaled_defaults(self) -> tuple[str, ...]:
        """Fields this config derived from --train-iters because they were not given."""
        return getattr(self, "_scaled", ())


@dataclass
class DataConfig:
    data_path: list = opt(help="Megatron-style dataset prefixes: PREFIX or W1 PREFIX1 W2 PREFIX2 ...", group=DATA,
                          factory=list, default_text="the bundled Shakespeare corpus")
    split: str = opt("969,30,1", "train,validation,test weights of the documents", DATA)
    extra_valid_data_path: list = opt(help="extra validation sets (dataset prefixes, all documents used), each "
                                      "evaluated and logged by name: e.g. a held-out domain", group=DATA,
                                      factory=list, default_text="none")
    tokenizer_type: str = opt("SentencePieceTokenizer", "SentencePieceTokenizer or GPT2BPETokenizer", DATA)
    tokenizer_model: Optional[str] = opt(None, "SentencePiece model file", DATA,
                                         default_text="the bundled corpus's tokenizer")
    vocab_file: Optional[str] = opt(None, "GPT-2 BPE vocabulary (encoder.json)", DATA)
    merge_file: Optional[str] = opt(None, "GPT-2 BPE merges (vocab.bpe)", DATA)
    cache_dir: str = opt(".cache", "where the bundled corpus, tokenizer and sample indices are built", DATA)


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "directory for checkpoints (one iter_XXXXXXX/ per save)", CKPT)
    load: Optional[str] = opt(None, "directory to resume from (its latest_checkpointed_iteration.txt)", CKPT)
    save_interval: Optional[int] = opt(None, "save every N iterations (and at the end of training)", CKPT,
                                       check=at_least(1), default_text="at the end only")
    keep_last: Optional[int] = opt(None, "keep only the newest N checkpoints under --save", CKPT, check=at_least(1),
                                   default_text="keep all")
    exit_signal_handler: bool = opt(False, "on SIGTERM: save at the end of the current step, then exit cleanly",
                                    CKPT)
    exit_interval: Optional[int] = opt(None, "save (with --save) and exit after an iteration divisible by N", CKPT,
                                       check=at_least(1))
    no_load_optim: bool = opt(False, "load model weights only (fresh optimizer and loss scaler)", CKPT)
    no_load_rng: bool = opt(False, "do not restore the RNG streams", CKPT)
    finetune: bool = opt(False, "load weights only and start at iteration 0 (implies --no-load-optim and "
                         "--no-load-rng)", CKPT)
    save_failure: str = opt("stop", "a save that cannot write (disk full, file-size limit, permission): stop "
                            "(one line, non-zero exit, the previous checkpoint intact) or continue (the same line "
                            "as a warning, training goes on)", CKPT, check=one_of("stop", "continue"))


@dataclass
class EngineConfig:
    # Mixed precision (both engines): compute in bf16/fp16, fp32 master weights and optimizer state.
    bf16: bool = opt(False, "bf16 compute, fp32 master weights and optimizer state", PREC)
    fp16: bool = opt(False, "fp16 compute with loss scaling, fp32 master weights and optimizer state", PREC)
    loss_scale: Optional[float] = opt(None, "fp16: a static loss scale", PREC, check=positive(),
                                      default_text="dynamic loss scaling")
    initial_loss_scale: float = opt(2.0 ** 16, "fp16: initial dynamic loss scale", PREC, check=positive())
    min_loss_scale: float = opt(1.0, "fp16: smallest dynamic loss scale", PREC, check=positive())
    loss_scale_window: int = opt(1000, "fp16: grow the scale after this many steps without overflow", PREC,
                                 check=at_least(1))
    hysteresis: int = opt(2, "fp16: overflowing steps tolerated before the scale shrinks", PREC, check=at_least(1))
    recompute_activations: bool = opt(False, "shorthand for --recompute-granularity selective", TRAIN)
    recompute_granularity: Optional[str] = opt(None, "activation recompute of the sampled subnetwork: full (whole "
                                               "layers) or selective (core attention)", TRAIN,
                                               check=one_of("full", "selective"), default_text="off")
    recompute_num_layers: Optional[int] = opt(None, "full recompute: only the first N layers of each stage", TRAIN,
                                              check=at_least(1), default_text="all")
    deepspeed: bool = opt(False, "DeepSpeed ZeRO as the memory engine (imported only when asked for)", DS)
    deepspeed_config: Optional[str] = opt(None, "a DeepSpeed JSON, used as is (batch sizes checked against ours; "
                                          "implies --deepspeed)", DS, default_text="derived from the flags")
    zero_stage: Optional[int] = opt(None, "ZeRO stage of the derived config (0-3)", DS, check=one_of(0, 1, 2, 3),
                                    default_text="1, or the JSON's")
    offload_optimizer: bool = opt(False, "derived config: ZeRO optimizer state (and step) on the CPU", DS)
    overlap_grad_reduce: bool = opt(True, "plain engine: average data-parallel gradients in buckets during the "
                                    "last micro-batch's backward, as DDP does, in place in one flat gradient "
                                    "buffer (--no-overlap-grad-reduce: one all-reduce pass after the backward)",
                                    DIST)
    use_apex: bool = opt(True, "apex's fused norms/Adam on GPU when its CUDA extensions load, else torch-native",
                         PREC)
    tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls on GPUs of compute capability >= 8 (--no-tf32 for "
                     "full fp32, e.g. to compare with a CPU run)", PREC)
    keep_host_memory: bool = opt(True, "CPU ranks: keep freed memory for reuse instead of glibc handing it back "
                                 "and page-faulting it in every step (megatron_est/host_memory.py; "
                                 "--no-keep-host-memory for glibc's defaults)", TRAIN)

    def __post_init__(self) -> None:
        if self.recompute_activations and self.recompute_granularity is None:
            self.recompute_granularity = "selective"
        if self.deepspeed_config:  # --deepspeed_config implies --deepspeed
            self.deepspeed = True

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    est: ESTConfig = field(default_factory=ESTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# ------------------------------------------------------------------------------------------ flag names
# (section, dataclass, flag prefix): every field is a flag, `num_layers` -> `--num-layers`.
SECTIONS = (("model", ModelConfig, ""), ("parallel", ParallelConfig, ""), ("est", ESTConfig, "est-"),
            ("train", TrainConfig, ""), ("data", DataConfig, ""), ("checkpoint", CheckpointConfig, ""),
            ("engine", EngineConfig, ""))
# Megatron spells a few flags differently from our field names; None: derived, not a flag.
FLAG_NAMES = {("model", "family"): "model-family", ("data", "cache_dir"): "data-cache-dir",
              ("parallel", "data_parallel_size"): None}


def flag_name(section: str, name: str, prefix: str = "") -> Optional[str]:
    """The command-line spelling of a field (without the leading dashes), or None when it is not a flag."""
    return FLAG_NAMES.get((section, name), prefix + name.replace("_", "-"))


def check_fields(cfg: Config) -> None:
    """Each value on its own, in flag order: the first bad one is refused, naming its flag and the range."""
    for section, _, prefix in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            check, value = f.metadata.get("check"), getattr(sub, f.name)
            flag = flag_name(section, f.name, prefix)
            if check is None or value is None or flag is None:
                continue
            problem = check(value)
            if problem and problem.startswith("unknown"):
                raise ConfigError(f"--{flag}: {problem}")
            if problem:
                raise ConfigError(f"--{flag} {problem}, got {value!r}")


# ---------------------------------------------------------------------------------------------- presets
MODEL_PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(family="gpt2", num_layers=12, hidden_size=768, num_attention_heads=12,
                      vocab_size=50257, seq_length=1024),
    "gpt2-medium": dict(family="gpt2", num_layers=24, hidden_size=1024, num_attention_heads=16,
                        vocab_size=50257, seq_length=1024),
    "tinyllama-1.1b": dict(family="llama", num_layers=22, hidden_size=2048, num_attention_heads=32,
                           num_query_groups=4, ffn_hidden_size=5632, vocab_size=32000, norm_epsilon=1e-5,
                           rotary_base=10000.0, seq_length=2048),
    # Tiny CPU presets for tests and demos.
    "gpt2-tiny": dict(family="gpt2", num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=8192,
                      seq_length=256),
    "llama-tiny": dict(family="llama", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                       ffn_hidden_size=688, vocab_size=8192, seq_length=256),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"--model-preset: unknown preset {name!r} (known: {', '.join(MODEL_PRESETS)})")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})
