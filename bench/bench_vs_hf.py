"""Full-model training step (forward + backward) of our GPT-2 against transformers' GPT2LMHeadModel.

    python bench/bench_vs_hf.py                          # GPT-2 124M shape, seq 256, micro-batch 4

Same shapes, same weights (copied across), same tokens; interleaved rounds, median times, and the ratio.
Both use torch's scaled_dot_product_attention.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved_times, median, model_bench_setup  # noqa: E402
from megatron_est.convert.hf import hf_config_dict, to_hf_state_dict  # noqa: E402
from megatron_est.model.language_model import LanguageModel  # noqa: E402


def main() -> None:
    args, cfg, tokens = model_bench_setup(__doc__)
    import transformers

    ours = LanguageModel(cfg, seed=0)
    conf = hf_config_dict(cfg)
    conf.pop("model_type"), conf.pop("architectures")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**conf, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    ids, labels = tokens[:, :-1], tokens[:, 1:]

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours(ids, labels).mean().backward()

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids).loss.backward()  # HF shifts labels internally: same loss over s-1 tokens

    times = interleaved_times({"megatron_est": ours_step, "transformers": hf_step}, args.reps)
    a, b = median(times["megatron_est"]), median(times["transformers"])
    print(f"# bench_vs_hf: preset {args.preset}, seq {cfg.seq_length}, micro-batch {args.micro_batch_size}, "
          f"threads {args.threads}, reps {args.reps}, transformers {transformers.__version__}")
    print("| model | median fwd+bwd s | ratio to transformers |")
    print("|---|---|---|")
    print(f"| megatron_est GPT-2 | {a:.3f} | {a / b:.3f} |")
    print(f"| transformers GPT2LMHeadModel | {b:.3f} | 1.000 |")


if __name__ == "__main__":
    main()
