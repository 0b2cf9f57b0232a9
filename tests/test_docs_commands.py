"""The example commands of README.md and docs/*.md, checked against the live code (not a copy of its flags).

- Training commands (`python pretrain_gpt.py ...`, `torchrun --nproc-per-node N ...`, `deepspeed ...`,
  `python -m megatron_est.planning.dry_run ...`) run through the real entry point as `--dry-run` at the world size
  the command states (torchrun's processes x nodes, or what `WORLD_SIZE=.. RANK=..` mean to the launcher code):
  parsed by megatron_est.arguments, validated by megatron_est.validation, planned on the meta device. A command
  followed in its block by an `error:` line must be refused with exactly that line; every other must pass.
- Tool and benchmark commands: every flag they use exists in that tool's own --help (and the training flags after
  `--` parse with the training parser); tools/est_flops.py, instant, runs.
- `sbatch examples/slurm/...`: the script, run from another directory with `SLURM_SUBMIT_DIR` = the repository
  (what sbatch sets) and no MEGATRON_EST_DIR, prints training flags (DRY_RUN=1) that the parser accepts.

Placeholders in the docs: `...` (more flags) is dropped, `[--optional flags]` are left out, and `ds.json` is one
of the shipped DeepSpeed JSONs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from megatron_est.config import ConfigError
from tests.helpers import ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TRAIN_SCRIPTS = {"pretrain_gpt.py": "gpt2-tiny", "pretrain_llama.py": "llama-tiny"}
PLACEHOLDER_FILES = {"ds.json": "examples/deepspeed/zero2.json"}
_START = re.compile(r"^(\$ )?([A-Z_]+=\S+ )*(\.venv/bin/)?(python3?|torchrun|deepspeed|sbatch|bash) ")


@dataclasses.dataclass
class DocCommand:
    where: str  # file:line
    env: dict
    argv: list  # program words, without the env assignments
    error: str | None  # the documented refusal, if the block shows one

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.argv)}"


def _blocks(text: str):
    """(line number, [lines]) of each indented (4 spaces) code block."""
    block, start = [], 0
    for n, line in enumerate(text.split("\n") + ["(end)"], 1):
        if line.startswith("    ") or (block and not line.strip()):
            if not block:
                start = n
            block.append(line[4:])
        else:
            if block:
                yield start, block
            block = []


def _commands_in(path: str) -> list[DocCommand]:
    out = []
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    for start, lines in _blocks(text):
        i = 0
        while i < len(lines):
            first = i
            line = lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            if not _START.match(line):
                continue
            error = lines[i].strip() if i < len(lines) and lines[i].strip().startswith("error:") else None
            for part in line.removeprefix("$ ").split(" && "):
                words = shlex.split(part, comments=True)
                env = {}
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    env[k] = v
                out.append(DocCommand(f"{path}:{start + first}", env, words, error))
    return out


def all_commands() -> list[DocCommand]:
    return [c for path in DOCS for c in _commands_in(path)]


def _without_placeholders(words: list[str]) -> list[str]:
    """Drop `[optional ...]` groups, shell variables and a `...` that is not a flag's value."""
    out, depth = [], 0
    for w in words:
        if w.startswith("["):
            depth += 1
        if depth:
            depth -= w.endswith("]")
            continue
        if "$" in w:  # a shell variable: drop it, and the flag it is the value of
            if out and out[-1].startswith("--"):
                out.pop()
            continue
        if w == "..." and not (out and out[-1].startswith("--")):
            continue
        out.append(PLACEHOLDER_FILES.get(w, w))
    return out


def _launch(c: DocCommand) -> tuple[str | None, list[str], int | None]:
    """(training script or module, its flags, world size stated by the launcher or None) of a command."""
    words = c.argv[1:]
    prog = os.path.basename(c.argv[0])
    world = None
    if prog in ("torchrun", "deepspeed"):
        opts = {}
        while words and words[0].startswith("-"):
            key = words.pop(0)
            opts[key] = words.pop(0) if "=" not in key else key.split("=", 1)[1]
        nproc = int(opts.get("--nproc-per-node", opts.get("--nproc_per_node", opts.get("--num_gpus", 1))))
        world = nproc * int(opts.get("--nnodes", opts.get("--num_nodes", 1)))
    elif words[:2] == ["-m", "megatron_est.planning.dry_run"]:
        return "megatron_est.planning.dry_run", words[2:], None
    return (words[0] if words else None), words[1:], world


TRAINING = [c for c in all_commands() if _launch(c)[0] in (*TRAIN_SCRIPTS, "megatron_est.planning.dry_run")]


def _launcher_world(c: DocCommand, world: int | None, monkeypatch) -> int:
    """The world size training will see: torchrun's, or what the command's environment means to our launcher."""
    from megatron_est.parallel.state import env_rank_and_world

    if world is not None:
        return world
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    return env_rank_and_world()[1]


def _dry_run(argv: list[str], preset: str) -> tuple[int, str, str]:
    """The entry point with --dry-run (what `pretrain_*.py --dry-run` runs): exit status, stdout, stderr."""
    from megatron_est.training.pretrain import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv, default_preset=preset)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def test_the_docs_have_commands_to_check():
    assert len(TRAINING) >= 15
    assert any(c.error for c in TRAINING) and any(c.argv[0] == "torchrun" for c in TRAINING)


@pytest.mark.parametrize("c", TRAINING, ids=str)
def test_training_command_plans_or_is_refused_as_documented(c, monkeypatch):
    script, flags, world = _launch(c)
    flags = _without_placeholders(flags)
    preset = TRAIN_SCRIPTS.get(script, "gpt2-tiny")
    argv = flags + ([] if "--dry-run" in flags else ["--dry-run"])
    if "--world-size" not in flags and script != "megatron_est.planning.dry_run":
        argv += ["--world-size", str(_launcher_world(c, world, monkeypatch))]
    monkeypatch.chdir(ROOT)
    code, out, err = _dry_run(argv, preset)
    if c.error:
        assert (code, err.strip()) == (2, c.error), f"{c}\n  documented: {c.error}\n  printed: {err.strip()}"
    else:
        assert code == 0, f"{c}\n  {err.strip()}"
        assert "training FLOPs" in out


# ------------------------------------------------------------------------------------------ tools, benches
TOOLS = [c for c in all_commands() if (_launch(c)[0] or "").startswith(("tools/", "bench/"))]
PASSES_TRAINING_FLAGS = {"tools/tune_deepspeed.py"}  # takes its own flags and any training flag beside them
RUN = {"tools/est_flops.py"}  # instant on CPU: run for real


def _help_text(path: str, sub: list[str], monkeypatch) -> str:
    """A tool's own --help (its main, in this process), for a subcommand when it has them."""
    module = importlib.import_module(path[:-3].replace("/", "."))
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", [path, *sub, "--help"])  # for mains that read sys.argv
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        try:
            module.main([*sub, "--help"])
        except TypeError:  # main() without an argv parameter
            module.main()
    return out.getvalue()


def test_the_docs_have_tool_commands_to_check():
    assert len(TOOLS) >= 20


@pytest.mark.parametrize("c", TOOLS, ids=str)
def test_tool_command_uses_only_flags_the_tool_has(c, monkeypatch):
    from megatron_est.arguments import parse_args

    path, flags, _ = _launch(c)
    ours = flags[: flags.index("--")] if "--" in flags else flags
    sub = [ours[0]] if ours and not ours[0].startswith("-") and path == "tools/convert_checkpoint.py" else []
    text = _help_text(path, sub, monkeypatch)
    used = {w.split("=", 1)[0] for w in _without_placeholders(ours) if w.startswith("--")}
    missing = {f for f in used if not re.search(re.escape(f) + r"(?![\w-])", text)}
    if path in PASSES_TRAINING_FLAGS:
        from megatron_est.arguments import build_parser

        missing -= set(build_parser("x", "gpt2-tiny")._option_string_actions)
    missing = sorted(missing)
    assert not missing, f"{c}\n  not in {path} --help: {missing}"
    if "--" in flags:  # the training flags a study or benchmark passes on
        parse_args(_without_placeholders(flags[flags.index("--") + 1:]), "x", "gpt2-tiny")
    if path in RUN:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            importlib.import_module(path[:-3].replace("/", ".")).main(_without_placeholders(flags))
        assert "saved" in out.getvalue()


# ---------------------------------------------------------------------------------------------- sbatch
SBATCH = [c for c in all_commands() if c.argv[0] == "sbatch"]


@pytest.mark.parametrize("c", SBATCH, ids=str)
def test_sbatch_command_from_the_repository_root_needs_no_megatron_est_dir(c, tmp_path):
    """As sbatch runs it: from its spool copy, in the submit directory's job, SLURM_SUBMIT_DIR set."""
    from megatron_est.arguments import parse_args

    script = next(w for w in c.argv[1:] if w.endswith(".sbatch"))
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_EST_DIR"}
    env.update(SLURM_SUBMIT_DIR=ROOT, DRY_RUN="1", PYTHON=sys.executable, SLURM_GPUS_ON_NODE="8")
    env.update({k: v.replace("$PWD", ROOT) for k, v in c.env.items() if k != "PLAN"})
    out = subprocess.run(["bash", os.path.join(ROOT, script)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    preset = "llama-tiny" if "llama" in script else "gpt2-tiny"
    parse_args(out.stdout.splitlines(), "x", preset)
    env.pop("SLURM_SUBMIT_DIR")  # submitted from elsewhere: one line, not a confusing failure later
    bad = subprocess.run(["bash", os.path.join(ROOT, script)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "MEGATRON_EST_DIR" in bad.stderr


# ------------------------------------------------------------------------------------- the check can fail
def test_a_wrong_documented_refusal_fails_the_check(tmp_path, monkeypatch):
    """The README refusal as it was: WORLD_SIZE=2 without RANK (now refused for that), so the printed error
    differs from the documented one."""
    doc = tmp_path / "x.md"
    doc.write_text("Refused:\n\n    $ WORLD_SIZE=2 python pretrain_gpt.py --num-attention-heads 5 --hidden-size 320 "
                   "--tensor-model-parallel-size 2\n    error: --num-attention-heads 5 is not divisible by "
                   "--tensor-model-parallel-size 2\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (c,) = _commands_in("x.md")
    with pytest.raises((AssertionError, ConfigError), match="RANK is not"):  # refused before any plan
        test_training_command_plans_or_is_refused_as_documented(c, monkeypatch)
