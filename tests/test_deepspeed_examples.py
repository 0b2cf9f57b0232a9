"""Each shipped DeepSpeed JSON (examples/deepspeed) trains at DP=2 through --deepspeed_config: in fp32 (its bf16
section switched off, every other key as shipped) it gives the plain engine's curve exactly; as shipped (bf16)
it stays close to it (slow tier). zero1.json with PP=2 x DP=2: tests/test_deepspeed_pipeline.py; stages 2/3
are refused with pipeline parallelism (tests/test_examples.py)."""
import glob
import os

import pytest

from tests.engine_harness import make_cfg, parallel_state, run_deepspeed, run_plain
from tests.helpers import run_distributed
from tests.test_deepspeed_pipeline import close_in_bf16, fp32_copy, same_curve

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSONS = sorted(glob.glob(os.path.join(ROOT, "examples", "deepspeed", "*.json")))


def _worker(rank, world, tmp, as_shipped):
    st = parallel_state(rank, world, make_cfg())
    out = {"plain": run_plain(make_cfg(), st)}
    for path in JSONS:
        name = os.path.basename(path)
        used = path if as_shipped else fp32_copy(path, tmp)
        out[name] = run_deepspeed(make_cfg(engine={"deepspeed_config": used}), st)
    return out


@pytest.fixture(scope="module")
def dp2_fp32(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("ds_json")), False)


@pytest.fixture(scope="module")
def dp2_bf16():
    return run_distributed(_worker, 2, None, True)


def test_all_four_files_are_covered():
    assert [os.path.basename(p) for p in JSONS] == ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("name", [os.path.basename(p) for p in JSONS])
def test_json_in_fp32_gives_the_plain_curve_dp2(dp2_fp32, name):
    for r in dp2_fp32:
        same_curve(r[name], r["plain"], name + " in fp32")


@pytest.mark.slow
@pytest.mark.parametrize("name", [os.path.basename(p) for p in JSONS])
def test_json_as_shipped_trains_in_bf16_dp2(dp2_bf16, name):
    for r in dp2_bf16:
        close_in_bf16(r[name], r["plain"], name)
