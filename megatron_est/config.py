"""Typed configuration: one dataclass per concern, plus named presets. No global state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A bad flag or flag combination; the message is one line naming the flag."""


@dataclass
class ModelConfig:
    family: str = "gpt2"  # "gpt2" (learned positions, LayerNorm, GELU, biases, tied) or "llama"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (one KV head per query head)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden (gpt2)
    vocab_size: int = 8192  # tokenizer vocabulary; padded below
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None  # None: seq_length
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    # Derived from family unless given.
    normalization: Optional[str] = None  # "layernorm" | "rmsnorm"
    activation: Optional[str] = None  # "gelu" | "swiglu"
    position_embedding: Optional[str] = None  # "learned" | "rope"
    add_bias: Optional[bool] = None
    tie_embeddings: Optional[bool] = None

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
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1  # derived from the world size at launch
    # Uneven pipeline: layers on the first / last stage (None: an even share); the rest split evenly.
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    distributed_backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    # Timeout of every collective (Megatron's flag and default). Ranks waiting for rank 0 to build the data
    # indices wait this long too, outside any collective (data/builder.py). Raise it for slow checkpoint saves.
    distributed_timeout_minutes: float = 10.0
    # The plan's number of ranks, for --dry-run and the planning tools (no launcher there); when given to a
    # real run it must equal the launcher's world size.
    world_size: Optional[int] = None


@dataclass
class ESTConfig:
    schedule: str = "default"  # preset name, "none", or "START:pH,pM,pL;START:pH,pM,pL;..."
    layer_rescale: bool = False  # scale active residual branches by N_L / k_L
    stratified: bool = True
    # Number of sampling strata for heads/neurons (per layer) and for layers. None: the TP / PP size, which
    # balances the shards. Give fixed values to draw the same subnetworks whatever the parallel layout.
    tp_strata: Optional[int] = None
    pp_strata: Optional[int] = None
    seed: Optional[int] = None  # None: the training seed
    # Parameters outside the subnetwork: "freeze" (they and their AdamW moments stay untouched that step) or
    # "adamw" (zero gradient, AdamW moves them by momentum and weight decay); est/unsampled.py. One default in
    # every engine and layout (switching it is this one line); the study (docs/reproduction.md) measured freeze
    # 0.07 nats better than adamw at 36 tokens per parameter (3 seeds), 0.018 worse at 108 (1 seed).
    unsampled_update: str = "freeze"
    # Training-FLOPs saving to hit (a fraction): the schedule's stage starts are all scaled by one factor to get
    # within half a percentage point of it, for this model and --train-iters (est/fit.py).
    target_saving: Optional[float] = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None  # None: micro * data-parallel size
    train_iters: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 30
    lr_decay_iters: Optional[int] = None  # None: train_iters
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    metrics_file: Optional[str] = None
    num_threads: Optional[int] = None  # torch intra-op threads per rank on CPU
    # Observability (training/scalar_logs.py): TensorBoard event files, and W&B when wandb is installed
    # (offline unless WANDB_MODE says otherwise).
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    # Zero-shot tasks (evaluation/tasks.py, e.g. "arc_easy,piqa" or "all") run at each evaluation on the first
    # eval_limit documents of each (evaluation/in_training.py).
    eval_tasks: Optional[str] = None
    eval_limit: int = 100


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)  # Megatron style: [prefix] or [w1, p1, w2, p2, ...]
    split: str = "969,30,1"
    # Extra validation sets (prefixes, all of their documents), each evaluated on the full model at every
    # evaluation and logged by name beside val_loss: held-out domains the model does not train on.
    extra_valid_data_path: list = field(default_factory=list)
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    cache_dir: str = ".cache"


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory for checkpoints (one iter_XXXXXXX/ per save)
    load: Optional[str] = None  # directory to resume from (its latest_checkpointed_iteration.txt)
    save_interval: Optional[int] = None  # save every N iterations (and at the end of training)
    keep_last: Optional[int] = None  # keep only the newest N checkpoints under --save
    exit_signal_handler: bool = False  # on SIGTERM: save at the end of the current step, then exit cleanly
    exit_interval: Optional[int] = None  # save (with --save) and exit after an iteration divisible by N
    no_load_optim: bool = False  # load model weights only (fresh optimizer and loss scaler)
    no_load_rng: bool = False  # do not restore the RNG streams
    finetune: bool = False  # load weights only and start at iteration 0 (implies --no-load-optim/--no-load-rng)


@dataclass
class EngineConfig:
    # Mixed precision (both engines): compute in bf16/fp16, fp32 master weights and optimizer state.
    bf16: bool = False
    fp16: bool = False
    loss_scale: Optional[float] = None  # fp16: a static loss scale; None: dynamic loss scaling
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000  # grow the scale after this many steps without overflow
    hysteresis: int = 2  # overflowing steps tolerated before the scale shrinks
    # Activation recompute of the sampled subnetwork: "full" (whole layers) or "selective" (core attention).
    recompute_activations: bool = False  # Megatron's shorthand for --recompute-granularity selective
    recompute_granularity: Optional[str] = None
    recompute_num_layers: Optional[int] = None  # full: recompute only the first N layers of each stage
    # DeepSpeed ZeRO as the memory engine (imported only when asked for).
    deepspeed: bool = False
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON, used as is (batch sizes checked against ours)
    zero_stage: Optional[int] = None  # without a JSON: the ZeRO stage of the derived config (default 1)
    offload_optimizer: bool = False  # without a JSON: ZeRO optimizer state (and step) on the CPU
    use_apex: bool = True  # apex's fused norms/Adam on GPU when its CUDA extensions load, else torch-native
    tf32: bool = True  # TF32 for fp32 matmuls on compute capability >= 8 (Ampere+); --no-tf32: exact fp32

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



# ------------------------------------------------------------------------------------------- validation
def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: int) -> None:
    """Refuse invalid combinations up front (before any process group exists), one line naming the flags."""
    m, par, tr, est = cfg.model, cfg.parallel, cfg.train, cfg.est
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    _require(par.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
    _require(par.world_size is None or par.world_size == world_size,
             f"--world-size {par.world_size} disagrees with the launcher's world size {world_size}")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
             f"{m.num_query_groups}")
    _require(m.num_attention_heads % tp == 0,
             f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.num_query_groups % tp == 0,
             f"--num-query-groups {m.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    _require(m.padded_vocab_size % tp == 0,
             f"padded vocabulary {m.padded_vocab_size} is not divisible by --tensor-model-parallel-size {tp} "
             "(raise --make-vocab-size-divisible-by)")
    stage_ranges(cfg)  # refuses a layer count that does not split over the stages
    _require(m.seq_length <= m.max_position_embeddings,
             f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    _require(m.position_embedding != "rope" or m.head_dim % 2 == 0, "rotary embeddings need an even head size")
    gbs = tr.global_batch_size or tr.micro_batch_size * dp
    _require(tr.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    _require(gbs % (tr.micro_batch_size * dp) == 0,
             f"--global-batch-size {gbs} is not divisible by --micro-batch-size {tr.micro_batch_size} x "
             f"data-parallel size {dp}")
    _require(tr.train_iters >= 1, "--train-iters must be >= 1")
    _require(tr.lr > 0 and 0 <= tr.min_lr <= tr.lr, "--lr must be > 0 and --min-lr in [0, --lr]")
    _require(tr.lr_decay_style in ("cosine", "linear", "constant"),
             f"--lr-decay-style: unknown style {tr.lr_decay_style!r} (cosine, linear, constant)")
    _require(tr.eval_interval >= 1 and tr.log_interval >= 1, "--eval-interval and --log-interval must be >= 1")
    _validate_strata(cfg, tp, pp)
    _require(est.unsampled_update in ("freeze", "adamw"),
             f"--est-unsampled-update: unknown value {est.unsampled_update!r} (freeze or adamw; freeze, the default, "
             "is the same algorithm in every engine and layout)")
    _validate_engine(cfg, tp, pp, dp)
    from megatron_est.est.schedule import parse_schedule  # local: schedule.py imports ConfigError from here

    schedule = parse_schedule(est.schedule, tr.train_iters)
    if est.target_saving is not None:  # the FLOPs fit itself waits for the tokenizer's vocabulary (build_sampler)
        from megatron_est.est.fit import check_target

        check_target(est.target_saving, schedule)


def _validate_strata(cfg: Config, tp: int, pp: int) -> None:
    m, est = cfg.model, cfg.est
    hs = est.tp_strata or tp
    _require(hs % tp == 0, f"--est-tp-strata {hs} must be a multiple of --tensor-model-parallel-size {tp}")
    _require(m.ffn_hidden_size % hs == 0, f"--est-tp-strata {hs} does not divide --ffn-hidden-size")
    _require(m.queries_per_group > 1 or m.num_attention_heads % hs == 0,
             f"--est-tp-strata {hs} does not divide --num-attention-heads {m.num_attention_heads}")
    from megatron_est.parallel.partition import is_even

    if not is_even(stage_ranges(cfg)):  # uneven stages: the layer strata are the stages themselves
        _require(est.pp_strata in (None, pp), f"--est-pp-strata {est.pp_strata} must be unset (or {pp}) with "
                 "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
        return
    ls = est.pp_strata or pp
    _require(ls % pp == 0 and m.num_layers % ls == 0,
             f"--est-pp-strata {ls} must be a multiple of --pipeline-model-parallel-size {pp} and divide "
             f"--num-layers {m.num_layers}")


def stage_ranges(cfg: Config) -> tuple[tuple[int, int], ...]:
    """[start, end) layer range of every pipeline stage (ConfigError when the layers do not split)."""
    from megatron_est.parallel.partition import stage_layer_ranges  # local: partition imports ConfigError

    par = cfg.parallel
    return stage_layer_ranges(cfg.model.num_layers, par.pipeline_model_parallel_size,
                              par.decoder_first_pipeline_num_layers, par.decoder_last_pipeline_num_layers)


def _validate_engine(cfg: Config, tp: int, pp: int, dp: int) -> None:
    """Precision, recompute, checkpoint and DeepSpeed flags (the DeepSpeed JSON is read and checked here too)."""
    e, ck = cfg.engine, cfg.checkpoint
    _require(not (e.bf16 and e.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(e.recompute_granularity in (None, "full", "selective"),
             f"--recompute-granularity: unknown value {e.recompute_granularity!r} (full or selective)")
    _require(e.recompute_num_layers is None or (e.recompute_granularity == "full" and e.recompute_num_layers >= 1),
             "--recompute-num-layers needs --recompute-granularity full and a value >= 1")
    _require(e.initial_loss_scale > 0 and e.min_loss_scale > 0 and e.loss_scale_window >= 1 and e.hysteresis >= 1,
             "--initial-loss-scale, --min-loss-scale must be > 0 and --loss-scale-window, --hysteresis >= 1")
    for flag, value in (("--save-interval", ck.save_interval), ("--keep-last", ck.keep_last),
                        ("--exit-interval", ck.exit_interval)):
        _require(value is None or value >= 1, f"{flag} must be >= 1")
    _require(ck.save_interval is None or ck.save, "--save-interval needs --save")
    _require(not ck.exit_signal_handler or ck.save, "--exit-signal-handler needs --save (where to save on exit)")
    if not e.deepspeed:
        _require(e.zero_stage is None and not e.offload_optimizer,
                 "--zero-stage and --offload-optimizer need --deepspeed")
        return
    from megatron_est.training.deepspeed_config import check_deepspeed  # reads no more than the JSON

    check_deepspeed(cfg, tp, pp, dp)
