"""--pipeline-partition balanced (parallel/partition.py): the first/last stage layer counts that even out the
stages' FLOPs with the LM head on the last stage, against costs worked out by hand, and what --dry-run prints."""
import pytest

from megatron_est.config import Config, ConfigError, ParallelConfig, model_preset
from megatron_est.flops_rule import full_layer_forward_flops_per_token, head_forward_flops_per_token
from megatron_est.parallel.partition import balanced_first_last, head_cost_in_layers, stage_ranges
from megatron_est.planning.dry_run import main as dry_run_main


def _cfg(pp: int, partition: str = "balanced", first=None, last=None, **model) -> Config:
    return Config(model=model_preset("gpt2-124m", **model),
                  parallel=ParallelConfig(pipeline_model_parallel_size=pp, pipeline_partition=partition,
                                          decoder_first_pipeline_num_layers=first,
                                          decoder_last_pipeline_num_layers=last))


def test_gpt2_124m_head_cost_by_hand():
    m = model_preset("gpt2-124m")  # hidden 768, 12 heads of 64, MLP 3072, seq 1024, vocabulary padded to 50304
    layer = 2 * 768 * 36 * 64 + 2 * 2 * 12 * 1024 * 64 + 2 * 12 * 64 * 768 + 2 * 768 * 3072 * 2
    assert full_layer_forward_flops_per_token(m) == layer == 17_301_504
    assert head_forward_flops_per_token(m) == 2 * 768 * 50304
    assert head_cost_in_layers(m) == pytest.approx(77_266_944 / 17_301_504)  # 4.4659


@pytest.mark.parametrize("layers,pp,head,expected", [
    (12, 2, 4.4659, (8, 4)),  # costs 8 | 4 + 4.47: max 8.47 (9 | 3 + 4.47 would be 9; 7 | 5 + 4.47, 9.47)
    (12, 2, 0.0, (6, 6)),  # nothing on the last stage: even
    (8, 2, 2.5, (5, 3)),  # 5 | 5.5 (4 | 6.5, 6 | 4.5 -> 6)
    (12, 4, 4.4659, (3, 1)),  # 3 | 4 | 4 | 1 + 4.47 = 5.47; 5 | 3 | 3 | 5.47 ties and is less even
    (24, 4, 1.0, (6, 6)),  # even gives 7 on the last stage; nothing does better, so the even split wins the tie
    (10, 3, 2.0, (4, 2)),  # 4 | 4 | 2 + 2
])
def test_balanced_split_by_hand(layers, pp, head, expected):
    assert balanced_first_last(layers, pp, head) == expected


def test_balanced_split_beats_every_other_first_last_choice():
    # Reference: the largest stage cost of every legal (first, last) pair, enumerated independently.
    for layers, pp, head in [(12, 2, 4.4659), (16, 4, 3.3), (22, 4, 0.9), (9, 3, 6.0)]:
        first, last = balanced_first_last(layers, pp, head)

        def worst(f, l):
            rest = layers - f - l
            mids = [rest // (pp - 2)] * (pp - 2) if pp > 2 else []
            return max([f, *mids, l + head])

        legal = [(f, l) for f in range(1, layers) for l in range(1, layers - f + 1)
                 if (pp == 2 and f + l == layers) or (pp > 2 and layers - f - l >= pp - 2
                                                      and (layers - f - l) % (pp - 2) == 0)]
        assert worst(first, last) == min(worst(f, l) for f, l in legal)


def test_stage_ranges_follow_the_flag():
    assert stage_ranges(_cfg(2)) == ((0, 8), (8, 12))
    assert stage_ranges(_cfg(2, "even")) == ((0, 6), (6, 12))  # negative control: the default is unchanged
    assert stage_ranges(_cfg(1)) == ((0, 12),)  # nothing to balance on one stage
    assert stage_ranges(_cfg(2, vocab_size=1024)) == ((0, 6), (6, 12))  # a small head: even is balanced


def test_balanced_with_explicit_stage_counts_is_refused():
    with pytest.raises(ConfigError, match="--pipeline-partition balanced chooses --decoder-first-pipeline-num-layers"):
        stage_ranges(_cfg(2, first=6))


def test_dry_run_shows_the_split_and_hints_at_balanced(capsys):
    base = ["--model-preset", "gpt2-124m", "--pipeline-model-parallel-size", "2", "--train-iters", "100"]
    assert dry_run_main(base) == 0
    out = capsys.readouterr().out
    assert "pipeline stages: layers 0-5 | 6-11 (--pipeline-partition even); LM head = 4.47 layers" in out
    assert "max/mean 1.27" in out and "hint: --pipeline-partition balanced would split the layers 8 + 4" in out
    assert dry_run_main(base + ["--pipeline-partition", "balanced"]) == 0
    out = capsys.readouterr().out
    assert "layers 0-7 | 8-11 (--pipeline-partition balanced)" in out and "max/mean 1.03" in out
    assert "hint: --pipeline-partition" not in out
