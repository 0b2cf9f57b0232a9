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
    # The plan's number of ranks, for --dry-run and the planning tools (no launcher there); when given to a
    # real run it must equal the launcher's world size.
    world_size: Optional[int] = None
    # Timeout of every collective (Megatron's flag and default). Ranks waiting for rank 0 to build the data
    # indices wait this long too, outside any collective (data/builder.py). Raise it for slow checkpoint saves.
    distributed_timeout_minutes: float = 10.0


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
    # --dry-run: check the plan and print its parameters, FLOPs and memory per rank (planning/dry_run.py), then
    # exit: no data, no weights, no process group (--world-size N plans N ranks).
    dry_run: bool = False
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
