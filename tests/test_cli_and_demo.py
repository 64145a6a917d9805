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


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path):
    res = run([str(ROOT / "examples" / "train_long_context.py"), "--backend", "aot_eager", "--seq-len", "256",
               "--steps", "2", "--chunk-size", "64", "--out", str(tmp_path / "demo")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    passes = sorted(r["pass"] for r in summary["report"]["rewrites"])
    assert passes == ["chunked_attention", "chunked_attention", "tiled_lm_loss"], passes
    assert summary["memory"]["optimized"]["host_pool_peak_bytes"] > 0
    assert (tmp_path / "demo.dot").exists()
