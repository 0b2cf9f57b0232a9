"""Verified checkpoints, fault-injected on real files and real processes: a shard with flipped bytes and a
truncated shard are reported and the newest intact checkpoint loads instead (the resumed run continues the
uninterrupted curve from there); a checkpoint without a manifest loads "unverified"; --keep-last keeps the newest
saves whatever their iteration numbers; a save over a file-size limit stops in one line with the previous
checkpoint intact (or goes on with --save-failure continue); a crafted pickle in a DeepSpeed checkpoint is refused
by --load and by export-hf without running."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from megatron_est.config import ConfigError
from megatron_est.parallel.state import ParallelState
from megatron_est.training import checkpoint_layout as layout, checkpoint_manifest as manifest
from tests.engine_harness import make_cfg, run_plain, with_checkpoint
from tests.helpers import ROOT, tiny_cli_argv

SHARD = os.path.join("mp_rank_00", layout.SHARD_FILE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One process, 8 iterations, a checkpoint every 2: the uninterrupted losses and the checkpoint folder."""
    torch.set_num_threads(1)
    ckdir = str(tmp_path_factory.mktemp("ck"))
    full = run_plain(with_checkpoint(make_cfg(), save=ckdir, save_interval=2), ParallelState())
    return ckdir, full["losses"]


def _copy(saved, tmp_path) -> str:
    dst = str(tmp_path / "ck")
    shutil.copytree(saved[0], dst)
    return dst


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, len(data) // 2 + 8):  # inside the tensor data: torch.load does not notice
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def test_every_checkpoint_has_a_manifest_that_verifies(saved):
    ckdir, _ = saved
    for it in (2, 4, 6, 8):
        d = os.path.join(ckdir, layout.iter_dir_name(it))
        assert manifest.verify(d) == ("ok", None)
        assert sorted(manifest.read_manifest(d)["files"]) == ["metadata.json", "mp_rank_00/model_optim_rng.pt"]
    assert layout.save_order(ckdir) == [2, 4, 6, 8]


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped", "truncated"])
def test_damaged_latest_falls_back_and_resumes_from_the_older_checkpoint(damage, saved, tmp_path, capfd):
    ckdir = _copy(saved, tmp_path)
    bad = os.path.join(ckdir, "iter_0000008", SHARD)
    damage(bad)
    cfg = with_checkpoint(make_cfg(), save=ckdir, load=ckdir, save_interval=2)
    assert layout.resolve_load(cfg) == (ckdir, 6)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: --load {ckdir}: {bad} ")
    assert err[0].endswith("; falling back to iteration 6, the newest intact checkpoint")
    resumed = run_plain(cfg, ParallelState())
    assert (resumed["start"], resumed["end"]) == (6, 8)
    assert all(resumed["losses"][it] == saved[1][it] for it in (7, 8))  # bitwise: the older checkpoint's curve
    assert manifest.verify(os.path.join(ckdir, "iter_0000008")) == ("ok", None)  # rewritten intact


def test_two_damaged_fall_back_further_and_none_intact_is_refused(saved, tmp_path, capfd):
    ckdir = _copy(saved, tmp_path)
    _flip(os.path.join(ckdir, "iter_0000008", SHARD))
    os.remove(os.path.join(ckdir, "iter_0000006", "metadata.json"))
    cfg = with_checkpoint(make_cfg(), load=ckdir)
    assert layout.resolve_load(cfg) == (ckdir, 4)
    assert "falling back to iteration 4, the newest intact checkpoint (1 more damaged)" in capfd.readouterr().err
    for it in (2, 4):
        _truncate(os.path.join(ckdir, layout.iter_dir_name(it), SHARD))
    with pytest.raises(ConfigError, match=r"no intact checkpoint: .*iter_0000008.* \(and 3 more damaged\)") as e:
        layout.resolve_load(cfg)
    assert "\n" not in str(e.value)


def test_checkpoint_without_manifest_loads_unverified(saved, tmp_path, capfd):
    ckdir = _copy(saved, tmp_path)
    os.remove(os.path.join(ckdir, "iter_0000008", manifest.MANIFEST_FILE))
    assert layout.resolve_load(with_checkpoint(make_cfg(), load=ckdir)) == (ckdir, 8)
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"warning: --load {ckdir}: iteration 8 has no manifest.json (saved before checkpoints had one): "
                   "loading it unverified"]


def test_keep_last_after_a_restart_into_a_folder_with_higher_iterations(saved, tmp_path):
    """A fresh run saving into a folder that holds iterations 2-8 of an earlier run: --keep-last 2 keeps the two
    checkpoints it wrote (iterations 2 and 4, the newest saves), and the pointer names one that exists."""
    ckdir = _copy(saved, tmp_path)
    run_plain(with_checkpoint(make_cfg(iters=4), save=ckdir, save_interval=2, keep_last=2), ParallelState())
    assert sorted(os.listdir(ckdir)) == ["iter_0000002", "iter_0000004", layout.LATEST_FILE]
    assert layout.read_latest_iteration(ckdir) == 4
    assert layout.resolve_load(with_checkpoint(make_cfg(), load=ckdir)) == (ckdir, 4)


def test_prune_never_deletes_what_latest_names(saved, tmp_path):
    ckdir = _copy(saved, tmp_path)
    with open(os.path.join(ckdir, layout.LATEST_FILE), "w") as f:
        f.write("2")  # the oldest save
    assert layout.prune_list(ckdir, 1) == [os.path.join(ckdir, layout.iter_dir_name(it)) for it in (4, 6)]


# ------------------------------------------------------------------------------------ file-size limit
def _cli_argv(tmp_path, ck, extra=()):
    """A tiny GPT-2 through the real entry point, on a small indexed dataset written here."""
    return [*tiny_cli_argv(tmp_path, iters=4, eval_interval=4), "--save", ck, "--load", ck, "--save-interval", "2",
            *extra]


def _file_size_limit():
    """In the child: write() past 1 MB fails with EFBIG (SIGXFSZ ignored, or it would kill the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def _cli(argv, limit=False):
    code = f"import sys; sys.path.insert(0, {ROOT!r})\nfrom megatron_est.training.pretrain import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                          preexec_fn=_file_size_limit if limit else None)


def _save_under_limit(tmp_path, extra=()):
    """Iteration 2 saved without a limit (the shard is ~6 MB: GPT-2's vocabulary), then a resumed run whose
    save of iteration 4 cannot fit under the limit."""
    ck = str(tmp_path / "ck")
    first = _cli(_cli_argv(tmp_path, ck, ["--exit-interval", "2"]))
    assert first.returncode == 0, first.stderr
    return ck, _cli(_cli_argv(tmp_path, ck, extra), limit=True)


def _assert_intact_after_failure(ck):
    assert sorted(os.listdir(ck)) == ["iter_0000002", layout.LATEST_FILE]  # no partial or temporary file
    assert sorted(os.listdir(os.path.join(ck, "iter_0000002"))) == ["manifest.json", "metadata.json", "mp_rank_00"]
    assert manifest.verify(os.path.join(ck, "iter_0000002")) == ("ok", None)
    assert layout.read_latest_iteration(ck) == 2


_SAVE_UNDER_LIMIT = """
import resource, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from megatron_est.parallel.state import ParallelState
from megatron_est.config import ConfigError
from tests.engine_harness import make_cfg, run_plain, with_checkpoint
run_plain(with_checkpoint(make_cfg(iters=2), save={ck!r}, save_interval=2), ParallelState())  # fits
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))  # the shard does not fit
cfg = with_checkpoint(make_cfg(iters=4), save={ck!r}, load={ck!r}, save_interval=2, save_failure={policy!r})
try:
    out = run_plain(cfg, ParallelState())
    print("trained to", out["end"])
except ConfigError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(2)
"""


def _harness_under_limit(tmp_path, policy):
    """The harness in a child process: iteration 2 saved, then the limit, then a resumed run saving 4."""
    ck = str(tmp_path / "ck")
    code = _SAVE_UNDER_LIMIT.format(root=ROOT, ck=ck, policy=policy)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return ck, out


def test_file_size_limit_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    ck, out = _harness_under_limit(tmp_path, "stop")
    assert out.returncode == 2, out.stderr
    shard = os.path.join(ck, ".tmp.iter_0000004", SHARD)
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --save: checkpoint of iteration 4 not saved: {shard}: File too large (EFBIG); the previous "
        f"checkpoint (iteration 2) and {layout.LATEST_FILE} are unchanged")
    _assert_intact_after_failure(ck)
    resumed = run_plain(with_checkpoint(make_cfg(iters=4), save=ck, load=ck), ParallelState())
    assert (resumed["start"], resumed["end"]) == (2, 4)


def test_file_size_limit_with_save_failure_continue_reaches_the_end(tmp_path):
    ck, out = _harness_under_limit(tmp_path, "continue")
    assert out.returncode == 0 and "trained to 4" in out.stdout, out.stderr
    _assert_intact_after_failure(ck)


@pytest.mark.slow  # the entry point twice in a child process (~45 s on 2 busy cores)
def test_file_size_limit_during_a_save_stops_in_one_line(tmp_path):
    ck, out = _save_under_limit(tmp_path)
    assert out.returncode == 2, out.stderr
    shard = os.path.join(ck, ".tmp.iter_0000004", SHARD)
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --save: checkpoint of iteration 4 not saved: {shard}: File too large (EFBIG); the previous "
        f"checkpoint (iteration 2) and {layout.LATEST_FILE} are unchanged")
    assert "Traceback" not in out.stderr
    _assert_intact_after_failure(ck)
    again = _cli(_cli_argv(tmp_path, ck))  # room again: resumes from the previous checkpoint
    assert again.returncode == 0, again.stderr
    assert f"loaded checkpoint {ck} at iteration 2" in again.stdout
    assert layout.read_latest_iteration(ck) == 4


@pytest.mark.slow  # the entry point twice in a child process
def test_file_size_limit_with_save_failure_continue_trains_on(tmp_path):
    ck, out = _save_under_limit(tmp_path, ["--save-failure", "continue"])
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if "not saved" in line]
    assert len(warnings) == 1 and warnings[0].strip().startswith("warning: --save: checkpoint of iteration 4 not "
                                                                 "saved: ") and "File too large (EFBIG)" in warnings[0]
    assert warnings[0].endswith("training continues (--save-failure continue)")
    assert " done: 4 iterations" in out.stdout
    _assert_intact_after_failure(ck)


def test_save_into_a_directory_the_os_refuses_is_one_line():
    """No permission where --save points (/sys refuses a new directory even to root, as EPERM or EROFS; the tests
    run as root, which file permissions do not stop): one line with the path and errno, nothing written."""
    from megatron_est.training.checkpoint_write_errors import CheckpointSaveError

    ck = "/sys/megatron_est_no_such_checkpoint_dir"
    try:
        os.mkdir(ck)
    except OSError:
        pass
    else:
        os.rmdir(ck)
        pytest.skip("/sys accepts new directories here")
    with pytest.raises(CheckpointSaveError) as e:
        run_plain(with_checkpoint(make_cfg(iters=2), save=ck, save_interval=2), ParallelState())
    msg = str(e.value)
    assert msg.startswith(f"--save: checkpoint of iteration 2 not saved: {ck}: ") and "\n" not in msg
    assert msg.endswith("; no earlier checkpoint") and "(E" in msg  # the errno's name, e.g. (EPERM)
    assert not os.path.exists(ck)


# ------------------------------------------------------------------------------------------ safe loading
class _Payload:
    """Unpickling this calls open(marker, "w"): the marker exists if and only if the checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _ds_save_then_load_crafted(rank, world, ckdir, marker):
    from tests.engine_harness import parallel_state, run_deepspeed

    cfg = make_cfg(iters=2, engine={"deepspeed": True, "zero_stage": 1})
    st = parallel_state(rank, world, cfg)
    run_deepspeed(with_checkpoint(cfg, save=ckdir, save_interval=2), st)
    if rank == 0:  # the attacker: a payload in DeepSpeed's optimizer file, the manifest rewritten to match
        d = os.path.join(ckdir, "iter_0000002")
        target = os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        state = torch.load(target, weights_only=False)
        state["payload"] = _Payload(marker)
        torch.save(state, target)
        with open(os.path.join(d, manifest.MANIFEST_FILE), "w") as f:
            f.write(manifest.manifest_text(_local_entries(d), 99))
    torch.distributed.barrier()
    try:
        run_deepspeed(with_checkpoint(cfg, save=ckdir, load=ckdir, save_interval=2), st)
    except ConfigError as e:
        return str(e)
    return None


def _local_entries(d):
    return {rel: {"size": os.path.getsize(os.path.join(d, rel)), "crc32": manifest.crc32_of(os.path.join(d, rel))}
            for rel in manifest.list_files(d)}


@pytest.mark.slow  # two DeepSpeed runs (~45 s on 2 busy cores)
def test_crafted_pickle_in_a_deepspeed_checkpoint_is_refused_without_running(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.helpers import run_distributed
    from tools import convert_checkpoint as tool

    ckdir, marker = str(tmp_path / "ck"), str(tmp_path / "code_ran")
    bad = os.path.join(ckdir, "iter_0000002", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    errors = run_distributed(_ds_save_then_load_crafted, 2, ckdir, marker)
    for e in errors:
        assert e.startswith(f"--load: refusing {bad}: it holds ") and "\n" not in e, e
    assert not os.path.exists(marker)
    assert tool.main(["export-hf", "--load", ckdir, "--output", str(tmp_path / "hf")]) == 2
    assert not os.path.exists(marker)
    torch.load(bad, weights_only=False)  # what DeepSpeed's own loader would have done: the payload is live
    assert os.path.exists(marker)


# ------------------------------------------------------------------------------- SIGKILL in the new window
_KILLED_WRITING_MANIFEST = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from megatron_est.parallel.state import ParallelState
from megatron_est.training import checkpoint_manifest
from tests.engine_harness import make_cfg, run_plain, with_checkpoint
real, calls = checkpoint_manifest.manifest_text, []
def die_on_second(*a, **k):  # shards of iteration 4 written and checksummed, its manifest not yet
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
checkpoint_manifest.manifest_text = die_on_second
run_plain(with_checkpoint(make_cfg(), save={ck!r}, save_interval=2), ParallelState())
"""


def test_sigkill_before_the_manifest_resumes_bit_identically(saved, tmp_path, capfd):
    ck = str(tmp_path / "ck")
    out = subprocess.run([sys.executable, "-c", _KILLED_WRITING_MANIFEST.format(root=ROOT, ck=ck)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == -9, out.stderr
    assert sorted(os.listdir(ck)) == [".tmp.iter_0000004", "iter_0000002", layout.LATEST_FILE]
    cfg = with_checkpoint(make_cfg(), save=ck, load=ck, save_interval=2)
    assert layout.resolve_load(cfg) == (ck, 2) and capfd.readouterr().err == ""  # intact: no warning
    resumed = run_plain(cfg, ParallelState())
    assert (resumed["start"], resumed["end"]) == (2, 8)
    assert all(resumed["losses"][it] == saved[1][it] for it in range(3, 9))  # bitwise
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000004", "iter_0000006", "iter_0000008",
                                      layout.LATEST_FILE]
