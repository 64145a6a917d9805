"""The command line and the demo run end to end and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_explain_prints_table_and_writes_drawing(tmp_path):
    res = run(["-m", "longctx_compiler", "explain", "cli_factory:make", "--out", str(tmp_path / "r"), "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "sdpa -> chunked_attention" in res.stdout
    assert (tmp_path / "r.dot").read_text().startswith("digraph")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rewrites"][0]["pass"] == "chunked_attention"


def test_cli_rejects_bad_factory(tmp_path):
    res = run(["-m", "longctx_compiler", "explain", "no_such_module:make"], tmp_path)
    assert res.returncode != 0 and "cannot import" in res.stderr


def test_cli_help_lists_commands_and_config_fields(tmp_path):
    top = run(["-m", "longctx_compiler", "--help"], tmp_path)
    assert top.returncode == 0 and "explain" in top.stdout
    ex = run(["-m", "longctx_compiler", "explain", "--help"], tmp_path)
    assert ex.returncode == 0
    for field in ("--set", "attention.chunk_size", "attention.offload", "ssm.mode", "lm_loss.chunk_size", "backend", "strict"):
        assert field in ex.stdout, field


def test_cli_set_changes_the_config(tmp_path):
    res = run(["-m", "longctx_compiler", "explain", "cli_factory:make", "--out", str(tmp_path / "r"), "--json",
               "--set", "attention.chunk_size=4", "--set", "attention.offload=false"], tmp_path)
    assert res.returncode == 0, res.stderr
    (rw,) = json.loads((tmp_path / "r.json").read_text())["rewrites"]
    assert rw["details"]["chunk_size"] == 4 and rw["details"]["offload"] is False
    bad = run(["-m", "longctx_compiler", "explain", "cli_factory:make", "--set", "attention.chunk=4"], tmp_path)
    assert bad.returncode != 0 and "attention.chunk_size" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(["-m", "longctx_compiler", "explain", "cli_factory:make", "--set", "attention.chunk_size=-4"], tmp_path)
    assert bad.returncode != 0 and "invalid configuration" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("factory, words", [("cli_factory:needs_args", "must take no arguments (it needs width)"),
                                            ("cli_factory:raises", "raised RuntimeError: the checkpoint file is missing")])
def test_cli_factory_errors_are_one_line(tmp_path, factory, words):
    res = run(["-m", "longctx_compiler", "explain", factory], tmp_path)
    assert res.returncode != 0 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
    # -v shows the traceback for the user's own error.
    if factory.endswith("raises"):
        res = run(["-m", "longctx_compiler", "explain", factory, "-v"], tmp_path)
        assert "Traceback" in res.stderr


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    res = run([str(ROOT / "examples" / "train_long_context.py"), "--seq-len", "256", "--layers", "2", "--vocab", "256",
               "--steps", "2", "--chunk-size", "64", "--out", str(tmp_path / "demo")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    passes = sorted(r["pass"] for r in summary["report"]["rewrites"])
    # Two layers pipelined, the loss tiled, and the final norm run as a block (the stack's end).
    assert passes == ["chunked_attention", "chunked_attention", "pipelined_layers", "pipelined_layers", "tiled_lm_loss",
                      "tiled_tokenwise"], passes
    assert summary["memory"]["optimized"]["host_pool_peak_bytes"] > 0
    assert summary["memory"]["peak_ratio"] > 1 and "device peak of one training step" in res.stdout
    assert (tmp_path / "demo.dot").exists()
