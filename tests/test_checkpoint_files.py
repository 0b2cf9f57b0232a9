"""The pieces under verified checkpoints, on real files: the manifest finds flipped bytes, truncation and missing
files; the weights-only check passes DeepSpeed's own types and refuses a crafted pickle without running it; a
failed write is one line with the path and the errno text."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from megatron_est.config import ConfigError
from megatron_est.training import checkpoint_manifest as manifest
from megatron_est.training.checkpoint_write_errors import CheckpointWriteError, write_error
from tests.helpers import ROOT


def _checkpoint_dir(tmp_path):
    d = tmp_path / "iter_0000004"
    (d / "mp_rank_00").mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, d / "mp_rank_00" / "model_optim_rng.pt")
    (d / "metadata.json").write_text('{"iteration": 4}')
    (d / manifest.MANIFEST_FILE).write_text(manifest.manifest_text(manifest.hash_files(str(d)), save_seq=3))
    return d


def test_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    import zlib

    d = _checkpoint_dir(tmp_path)
    data = manifest.read_manifest(str(d))
    shard = d / "mp_rank_00" / "model_optim_rng.pt"
    assert sorted(data["files"]) == ["metadata.json", "mp_rank_00/model_optim_rng.pt"]
    assert data["files"]["mp_rank_00/model_optim_rng.pt"] == {
        "size": shard.stat().st_size, "crc32": f"{zlib.crc32(shard.read_bytes()):08x}"}
    assert data["save_seq"] == 3 and manifest.save_seq(str(d)) == 3
    assert manifest.verify(str(d)) == ("ok", None)


def test_flipped_bytes_truncation_and_missing_files_are_found(tmp_path):
    d = _checkpoint_dir(tmp_path)
    shard = d / "mp_rank_00" / "model_optim_rng.pt"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # one byte inside the tensor data: torch.load would not notice
    shard.write_bytes(bytes(flipped))
    assert torch.load(shard, weights_only=True)["w"].shape == (1000,)  # loads silently: why a checksum
    status, problem = manifest.verify(str(d))
    assert status == "damaged" and problem == f"{shard} fails its crc32 checksum (damaged)"
    shard.write_bytes(good[:-100])
    assert manifest.verify(str(d)) == ("damaged", f"{shard} has {len(good) - 100} bytes, the manifest says "
                                                  f"{len(good)} (truncated or overwritten)")
    shard.unlink()
    assert manifest.verify(str(d)) == ("damaged", f"{shard} is missing")


def test_no_manifest_is_unverified_and_a_broken_one_is_damaged(tmp_path):
    d = _checkpoint_dir(tmp_path)
    (d / manifest.MANIFEST_FILE).write_text('{"files": ')
    status, problem = manifest.verify(str(d))
    assert status == "damaged" and "manifest.json is unreadable" in problem
    (d / manifest.MANIFEST_FILE).unlink()
    assert manifest.verify(str(d)) == ("unverified", None)


# ----------------------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears if and only if the pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_deepspeed_types_pass_and_a_crafted_pickle_is_refused_without_running(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from megatron_est.training import safe_load

    ok = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(1),
                                      "single_partition_of_fp32_groups": [torch.ones(4)]}}
    torch.save(state, ok)
    safe_load.check_deepspeed_checkpoint(str(tmp_path))  # DeepSpeed's own types are allowed
    marker = tmp_path / "code_ran"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8", "extra": _Payload(str(marker))}, bad)
    with pytest.raises(ConfigError) as e:
        safe_load.check_deepspeed_checkpoint(str(tmp_path))
    assert str(e.value).startswith(f"--load: refusing {bad}: it holds io.open") and "\n" not in str(e.value)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # what DeepSpeed's loader does: the payload is live
    assert marker.exists()


# ---------------------------------------------------------------------------------------- write errors
def test_write_error_names_the_path_and_errno_text():
    try:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as e:
        e.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        err = write_error("/ck/.tmp.iter_0000004/mp_rank_00/model_optim_rng.pt", e)
    assert isinstance(err, CheckpointWriteError) and isinstance(err, ConfigError)
    assert str(err) == "/ck/.tmp.iter_0000004/mp_rank_00/model_optim_rng.pt: No space left on device (ENOSPC)"
    err = write_error("/ck", PermissionError(errno.EACCES, "Permission denied", "/ck/iter_0000004"))
    assert str(err) == "/ck/iter_0000004: Permission denied (EACCES)"


def test_torch_save_over_a_file_size_limit_reports_efbig(tmp_path):
    """RLIMIT_FSIZE in a child process (SIGXFSZ ignored so that write() fails with EFBIG instead of killing it):
    torch.save into a file object (our writers) keeps the OSError; into a path (DeepSpeed's) it does not, and
    the limit is found instead."""
    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {ROOT!r})
from megatron_est.training.checkpoint_write_errors import write_error
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
for name, target in (("obj.pt", lambda p: open(p, "wb")), ("path.pt", lambda p: p)):
    path = {str(tmp_path)!r} + "/" + name
    try:
        torch.save(torch.zeros(100000), target(path))
    except Exception as e:
        print(write_error(path, e))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == [
        f"{tmp_path / 'obj.pt'}: File too large (EFBIG)",
        f"{tmp_path / 'path.pt'}: File too large (EFBIG: the file-size limit, ulimit -f, is 4096 bytes)"], out.stderr
