"""Sequence parallelism on real ``torch.distributed`` process groups (gloo, CPU), against one
process: loss and every parameter gradient of a float64 step equal the single-process run's."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx_compiler as lc
from lm_helpers import ids_for
from longctx_compiler.runtime.sequence_parallel import SequenceParallelError

transformers = pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("sp_worker.py")
EXACT = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, world, *args, timeout=600):
    """Run ``world`` ranks of the worker (as torchrun would) and return each rank's JSON."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        out = tmp_path / f"rank{rank}.json"
        procs.append((out, subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *map(str, args)],
                                            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, p in procs:
        log, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0 and out.exists(), log[-3000:]
        results.append(json.loads(out.read_text()))
    return results


def assert_exact(results, lengths, against_eager=EXACT, float32_params=()):
    """Loss and every gradient against eager in float64 (``against_eager``: float32 round-off
    where transformers computes in float32 inside) and against the same rewrites on one
    process: exact, but for the parameters the model itself casts to float32 (each rank's
    part of their gradient is rounded there, so the sum is float32 round-off away)."""
    for r in results:
        assert "error" not in r, r.get("traceback")
        assert [s["T"] for s in r["steps"]] == lengths
        for s in r["steps"]:
            # transformers returns the loss in float32 (its `.float()`); ours is computed in
            # float64 and rounded once per shard's part: float32 round-off.
            assert abs(s["loss"] - s["loss_ref"]) <= 4 * 2**-24 * abs(s["loss_ref"]), s
            assert s["worst_grad"] <= against_eager, s
            for name, err in s["vs_one_process"].items():
                assert err <= (1e-6 if name.endswith(float32_params) else EXACT), (name, err)
        assert r["compiles"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("P,lengths", [(2, [13, 16]), (4, [10])])
def test_llama_gqa_equals_one_process(tmp_path, P, lengths):
    # 13: not a multiple of P (padded); 10 over 4 ranks: shards of 3, the last one padding
    # but for one token. GQA with 2 KV heads: at P = 4 each KV head is replicated to 2 ranks.
    results = launch(tmp_path, P, "--P", P, "--model", "llama", "--lengths", *lengths)
    assert_exact(results, lengths)
    kinds = [k for _, k, _ in results[0]["rewrites"] if "Ulysses" in k]
    assert len(kinds) == 2, results[0]["rewrites"]  # every layer's attention
    assert any("global positions" in k for _, k, _ in results[0]["rewrites"])


@pytest.mark.slow
@pytest.mark.parametrize("name,lengths", [("mamba", [13, 16]), ("jamba", [13])])
def test_scans_sharded_over_time_equal_one_process(tmp_path, name, lengths):
    # Each rank's scan starts from the state the earlier ranks' shards leave (one all-gather
    # of [B, D, N] states per scan), and each causal convolution reads the previous shard's
    # last tokens (a halo); Jamba's attention layers are Ulysses'. transformers rounds the
    # scan's B and u to float32 (`.float()`) even in a float64 model, so eager is met to
    # float32 round-off; one process exactly, but for A_log, D and dt_proj.bias, which the
    # model casts to float32 before the scan (each rank's part of their gradient is rounded).
    results = launch(tmp_path, 2, "--P", 2, "--model", name, "--lengths", *lengths, "--vs-one-process")
    assert_exact(results, lengths, against_eager=1e-5, float32_params=(".A_log", ".D", "dt_proj.bias"))
    kinds = [k for _, k, _ in results[1]["rewrites"]]
    assert sum("time-sharded" in k for k in kinds) == 2 and sum("halo" in k for k in kinds) == 2, kinds
    assert sum("Ulysses" in k for k in kinds) == (2 if name == "jamba" else 0), kinds


@pytest.mark.slow
def test_shorter_than_the_group(tmp_path):
    # T = 3 on 4 ranks: one token per rank, the last rank all padding.
    assert_exact(launch(tmp_path, 4, "--P", 4, "--model", "llama_mha", "--lengths", 3), [3])


def test_no_process_group_is_a_clear_error():
    opt = lc.optimize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)),
        backend="aot_eager", distributed={"sequence_parallel": 2})
    ids = ids_for(8, 0)
    with pytest.raises(SequenceParallelError, match="init_process_group"):
        opt(ids, labels=ids)


@pytest.mark.slow
def test_bad_groups_batches_and_models_are_refused_on_every_rank(tmp_path):
    cases = {
        "not a multiple": (["--P", 4], "not a multiple of 4"),
        "different batches": (["--P", 2, "--different-batches"], "different batches"),
    }
    for name, (args, words) in cases.items():
        results = launch(tmp_path, 2, *args)
        for r in results:
            assert words in r.get("error", ""), (name, r)


def test_explain_shows_the_plan_on_one_process_with_a_simulated_group():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ids = ids_for(12, 0)
    report = lc.explain(model, ids, labels=ids, use_cache=False, config=lc.Config(distributed={"sequence_parallel": 4}))
    kinds = [r.kind for r in report.rewrites if r.pass_name == "sequence_parallel"]
    assert kinds.count("attention -> Ulysses all-to-all (heads <-> sequence)") == 2, report
    ulysses = [r.details for r in report.rewrites if "Ulysses" in r.kind]
    assert all(d["P"] == 4 and d["kv_replicated"] == 2 for d in ulysses), ulysses


def test_a_function_is_refused():
    # Its parameters are unknown, so their gradients could not be summed over the group.
    opt = lc.optimize(lambda x: x.sum(), backend="aot_eager", distributed={"sequence_parallel": 2})
    with pytest.raises(SequenceParallelError, match="nn.Module"):
        opt(torch.ones(1, 8))
