"""The attention benchmark runs end to end on the smallest settings and writes valid JSON.

Not a timed test and not a benchmark: it only checks that the script, its subprocess
isolation, the result file and the plot work (numbers are not judged here).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent


def test_attention_benchmark_smallest_settings(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [
        sys.executable, "-m", "benchmarks.run", "attention",
        "--tokens", "128", "--layers", "1", "--repeats", "1", "--chunk-size", "64", "--warmup-tokens", "64",
        "--methods", "eager_sdpa", "--attention-methods", "sdpa", "ours_offload",
        "--step-limit", "50", "--budget", "55", "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in results"))
    assert out.with_suffix(".png").stat().st_size > 0
    assert doc["benchmark"] == "attention"
    assert {"torch", "cpu_count", "device", "git_commit"} <= doc["environment"].keys()
    attn, model = doc["attention_only"]["runs"], doc["model"]["runs"]
    assert [(r["method"], r["tokens"]) for r in attn] == [("sdpa", 128), ("ours_offload", 128)]
    assert [(r["method"], r["tokens"]) for r in model] == [("eager_sdpa", 128)]
    for r in attn + model:
        assert r["status"] in ("ok", "timeout", "oom", "error", "skipped")
        if r["status"] == "ok":
            assert r["peak_bytes"] >= 0 and r["saved_bytes"] >= 0 and r["host_bytes"] >= 0
    ok = {r["method"]: r for r in attn if r["status"] == "ok"}
    if "ours_offload" in ok:
        assert ok["ours_offload"]["attention_rewrites"] == 1
        assert ok["ours_offload"]["host_bytes"] > 0
    if model[0]["status"] == "ok":
        assert math.isclose(model[0]["vs_eager_sdpa"]["time"], 1.0)
    assert {t["result"] for t in doc["targets"]} <= {"PASS", "FAIL", "NOT MEASURED"}


def test_isolated_runs_record_status_instead_of_failing():
    from benchmarks.common import OK, TIMEOUT, run_isolated

    ok = run_isolated("benchmarks.common", "sleep_worker", {"seconds": 0}, timeout_s=60)
    assert ok["status"] == OK and ok["result"] == {"slept_s": 0}
    wall = run_isolated("benchmarks.common", "sleep_worker", {"seconds": 60}, timeout_s=2)
    assert wall["status"] == TIMEOUT and wall["timeout_kind"] == "wall" and wall["progress"] == {"started": True}
    step = run_isolated("benchmarks.common", "sleep_worker", {"step_timeout": True}, timeout_s=60)
    assert step["status"] == TIMEOUT and step["timeout_kind"] == "measured"
    err = run_isolated("benchmarks.common", "sleep_worker", {"no_such_arg": 1}, timeout_s=60)
    assert err["status"] == "error" and "TypeError" in err["error"]
