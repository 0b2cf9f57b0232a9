"""The parallel layout (parallel/layout.py) against Megatron's rank formula and hand-written groups."""
import pytest

from megatron_est.config import ConfigError, TrainConfig
from megatron_est.parallel.layout import Layout


@pytest.mark.parametrize("tp,dp,pp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 4), (2, 2, 2), (2, 3, 4)])
def test_coordinates_follow_megatrons_formula(tp, dp, pp):
    layout = Layout(tp=tp, dp=dp, pp=pp)
    assert layout.world_size == tp * dp * pp
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert c == {"tp": rank % tp, "dp": (rank // tp) % dp, "pp": rank // (tp * dp)}
        assert layout.rank(**c) == c["pp"] * dp * tp + c["dp"] * tp + c["tp"] == rank


def test_groups_by_hand_tp2_dp2_pp2():
    layout = Layout(tp=2, dp=2, pp=2)
    assert layout.groups(["tp"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups(["dp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(["pp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups(["tp", "pp"]) == [[0, 1, 4, 5], [2, 3, 6, 7]]  # DeepSpeed's model-parallel groups


@pytest.mark.parametrize("dims", [["tp"], ["dp"], ["pp"], ["tp", "pp"], ["tp", "dp", "pp"]])
def test_groups_partition_the_world(dims):
    layout = Layout(tp=2, dp=3, pp=4)
    groups = layout.groups(dims)
    assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
    for g in groups:  # members differ only along dims
        fixed = [{d: v for d, v in layout.coords(r).items() if d not in dims} for r in g]
        assert all(f == fixed[0] for f in fixed)


def test_data_parallel_size_and_global_batch():
    layout = Layout.of(16, tp=2, pp=2)
    assert (layout.tp, layout.dp, layout.pp) == (2, 4, 2)
    assert layout.global_batch(TrainConfig(micro_batch_size=3)) == 12  # default: one micro-batch per DP rank
    assert layout.global_batch(TrainConfig(micro_batch_size=3, global_batch_size=48)) == 48
    assert layout.micro_batches(TrainConfig(micro_batch_size=3, global_batch_size=48)) == 4


@pytest.mark.parametrize("world,tp,pp,message", [
    (6, 4, 1, "world size 6 is not divisible by --tensor-model-parallel-size 4 x --pipeline-model-parallel-size 1"),
    (4, 0, 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")])
def test_refusals(world, tp, pp, message):
    with pytest.raises(ConfigError, match=message):
        Layout.of(world, tp, pp)
