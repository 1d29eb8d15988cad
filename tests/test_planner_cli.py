"""`meshtrain plan` end to end, in-process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from meshtrain.planner import add_parser, run
from meshtrain.planner.cli import main

pytestmark = pytest.mark.pure

SEARCH = [
    "plan",
    "--model",
    "llama3-8b",
    "--cluster",
    "h100-80gb",
    "--gpus",
    "16",
    "--global-batch",
    "32",
    "--seq",
    "4096",
]
TINY_CONFIG = """\
[model]
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
vocab_size = 256

[training]
steps = 10
global_batch = 8
micro_batch = 4
grad_accum = 1
seq_len = 128
"""


def test_add_parser_registers_plan() -> None:
    parser = argparse.ArgumentParser(prog="meshtrain")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(SEARCH)
    assert args.func is run


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--global-batch" in out and "llama3-70b" in out and "--budget" in out


def test_search_prints_ranked_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(SEARCH + ["--top", "3", "--tokens", "1T"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "time for 1T" in out and "why:" in out and "total on device" in out


def test_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(SEARCH + ["--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layouts"]) == 2 and data["fit"] >= 2
    assert data["layouts"][0]["step_time_s"] <= data["layouts"][1]["step_time_s"] * (1 + 1e-9)
    assert "why" in data and data["layouts"][0]["memory_bytes"]["params"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "--model", "llama3-8", "--gpus", "8", "--global-batch", "8"], "did you mean 'llama3-8b'"),
        (
            ["plan", "--model", "llama3-8b", "--cluster", "h100", "--gpus", "8", "--global-batch", "8"],
            "did you mean 'h100-80gb'",
        ),
        (["plan", "--model", "llama3-8b", "--global-batch", "8"], "--gpus"),
        (["plan", "--model", "llama3-8b", "--gpus", "eight", "--global-batch", "8"], "not a number"),
        (["plan"], "nothing to plan"),
        (
            ["plan", "--model", "llama3-8b", "--gpus", "8", "--global-batch", "8", "--schedules", "zb-v"],
            "zb-v is not searched",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert captured.out == ""


def test_config_mode_estimates_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG)
    assert main(["plan", "--config", str(path), "--nproc", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prediction"]["comm_all_reduce_bytes"] == 4 * 131392
    assert data["plan"]["layout"]["dp_shard"] == 2
    # default world: the product of the degrees with dp_shard=-1 as 1, and a --set override
    assert main(["plan", "--config", str(path), "--set", "training.global_batch=4"]) == 0
    assert "dp1" in capsys.readouterr().out


def test_config_mode_reports_validation_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG)
    assert main(["plan", "--config", str(path), "--nproc", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_budget_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--budget", "5.76e23", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sizing"]
    assert rows[0]["rule"] == "chinchilla" and round(rows[0]["params"] / 1e9) == 69
