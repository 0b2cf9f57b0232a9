"""--help is generated from the config fields: every flag has a description, a default and a Megatron-style metavar
(--num-layers NUM_LAYERS, never MODEL.NUM_LAYERS), grouped as Megatron groups them; old flag names keep working."""
import argparse
import dataclasses
import re
import subprocess
import sys

import pytest

from megatron_est.arguments import build_parser, parse_args
from megatron_est.config import GROUPS, SECTIONS, flag_name
from megatron_est.validation import validate
from tests.helpers import ROOT

PRESETS = ("gpt2-tiny", "llama-tiny")  # pretrain_gpt.py's and pretrain_llama.py's


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_flag_has_help_text_and_a_default(preset):
    for a in _flag_actions(build_parser("x", preset)):
        text = a.help or ""
        what, _, default = text.partition(" (default: ")
        assert what.strip(), f"{a.option_strings[0]} has no help text"
        assert default.rstrip(")").strip(), f"{a.option_strings[0]} shows no default"


@pytest.mark.parametrize("preset", PRESETS)
def test_metavars_are_megatron_style(preset):
    for a in _flag_actions(build_parser("x", preset)):
        if a.nargs == 0:  # a switch: no value
            continue
        long = a.option_strings[0]
        assert a.metavar == long[2:].upper().replace("-", "_"), (long, a.metavar)


def test_help_output_shows_no_internal_names_and_megatron_groups():
    out = subprocess.run([sys.executable, f"{ROOT}/pretrain_gpt.py", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    internal = re.findall(r"\b(?:MODEL|PARALLEL|EST|TRAIN|DATA|CHECKPOINT|ENGINE)\.[A-Z_]+", text)
    assert not internal, internal
    assert "--no-no-" not in text and "--no-load-optim" in text
    assert "--num-layers NUM_LAYERS" in text and "--lr LR" in text
    headers = [line[:-1] for line in text.splitlines() if line.endswith(":") and line[:-1] in GROUPS]
    assert headers == list(GROUPS)  # every group present, in Megatron's order
    assert "--num-layers NUM_LAYERS" in text.split("\nnetwork size:\n")[1].split("\n\n")[0]
    assert "--lr LR" in text.split("\nlearning rate:\n")[1].split("\n\n")[0]


def test_every_config_field_is_a_flag_in_a_known_group():
    parser = build_parser("x", "gpt2-tiny")
    dests = {a.dest for a in _flag_actions(parser)}
    for section, cls, prefix in SECTIONS:
        for f in dataclasses.fields(cls):
            if flag_name(section, f.name, prefix) is None:
                continue
            assert f"{section}.{f.name}" in dests, f.name
            assert f.metadata.get("group") in GROUPS, (section, f.name)


def test_negative_switches_have_one_spelling():
    parser = build_parser("x", "gpt2-tiny")
    strings = [s for a in _flag_actions(parser) for s in a.option_strings]
    assert not [s for s in strings if s.startswith("--no-no-")]
    cfg = parse_args(["--no-load-optim", "--no-load-rng"], "x", "gpt2-tiny")
    assert cfg.checkpoint.no_load_optim and cfg.checkpoint.no_load_rng


def test_existing_flag_spellings_still_parse(tmp_path):
    cfg = parse_args(["--no-est-stratified", "--no-tf32", "--no-use-apex", "--no-bf16", "--deepspeed_config",
                      str(tmp_path / "ds.json"), "--model-family", "llama", "--data-cache-dir", "c",
                      "--est-schedule", "none", "--lr", "3e-4", "--num-layers", "2"], "x", "gpt2-tiny")
    assert not cfg.est.stratified and not cfg.engine.tf32 and not cfg.engine.use_apex
    assert cfg.engine.deepspeed and cfg.engine.deepspeed_config.endswith("ds.json")
    assert cfg.model.family == "llama" and cfg.data.cache_dir == "c" and cfg.train.lr == 3e-4


def test_a_malformed_value_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--num-layers", "four"], "x", "gpt2-tiny")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --num-layers/" not in err and "--num-layers" in err, err


@pytest.mark.parametrize("iters,warmup,every", [(20, 2, 6), (5, 0, 1), (299, 29, 99), (300, 30, 100),
                                                (50_000, 30, 100)])
def test_warmup_and_eval_interval_follow_train_iters_when_not_given(iters, warmup, every):
    """--help's promise: a tenth of the run (at most 30) and a third of it (at most 100); the old fixed 30 / 100
    from 300 iterations on, so no run that gives them or trains 300+ iterations changes."""
    resolved = validate(parse_args(["--train-iters", str(iters)], "x", "gpt2-tiny"), 1)
    tr = resolved.config.train
    assert (tr.lr_warmup_iters, tr.eval_interval) == (warmup, every)
    notes = "\n".join(resolved.notes)
    assert f"--lr-warmup-iters not given: {warmup}" in notes and f"--eval-interval not given: {every}" in notes
    assert "--global-batch-size not given: 8 = --micro-batch-size 8 x data-parallel size 1" in notes


def test_given_values_are_kept_and_not_reported():
    argv = ["--train-iters", "20", "--lr-warmup-iters", "30", "--eval-interval", "100", "--global-batch-size", "8"]
    resolved = validate(parse_args(argv, "x", "gpt2-tiny"), 1)
    assert (resolved.config.train.lr_warmup_iters, resolved.config.train.eval_interval) == (30, 100)
    assert resolved.notes == ("warning: --lr-warmup-iters 30 >= --train-iters 20: the learning rate never reaches "
                              "--lr 0.001",)
