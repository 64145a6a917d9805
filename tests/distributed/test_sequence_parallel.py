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


# Packed documents (position_ids restarting at each; per row, the documents' lengths). Over
# 2 ranks (shards of 8, then 7) and 4 (shards of 4, the second batch padded by 3): documents
# that cross shard boundaries (up to three of them), start exactly at a shard's start, or
# fill whole shards. Each rank numbers the documents of its own shard of the positions; the
# attention reads them numbered over the whole sequence.
PACKED = ["6,2,5,3/3,10,3", "4,6,3/7,6"]


@pytest.mark.slow
@pytest.mark.parametrize("P,lengths", [(2, [13, 16]), (4, [10])])
def test_llama_gqa_equals_one_process(tmp_path, P, lengths):
    # 13: not a multiple of P (padded); 10 over 4 ranks: shards of 3, the last one padding
    # but for one token. GQA with 2 KV heads: at P = 4 each KV head is replicated to 2 ranks.
    # Then, in the same launch, a model of its own on packed documents.
    results = launch(tmp_path, P, "--P", P, "--model", "llama", "--lengths", *lengths, "--packed", *PACKED)
    assert_exact(results, lengths)
    kinds = [k for _, k, _ in results[0]["rewrites"] if "Ulysses" in k]
    assert len(kinds) == 2, results[0]["rewrites"]  # every layer's attention
    assert any("global positions" in k for _, k, _ in results[0]["rewrites"])
    packed = [r["packed"] for r in results]
    assert_exact(packed, [16, 13])
    assert all(s["worst_grad"] <= 1e-12 for r in packed for s in r["steps"]), packed
    for r in packed:
        kinds = [k for _, k, _ in r["rewrites"]]
        assert kinds.count("attention -> Ulysses all-to-all (heads <-> sequence)") == 2, kinds
        assert sum("(packed documents)" in k for k in kinds) == 2, kinds  # proven on every layer


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
@pytest.mark.parametrize("P,lengths,extra", [(2, [13], ["--offload"]), (4, [10, 29], [])])
def test_pipelined_layers_exchange_each_chunk(tmp_path, P, lengths, extra):
    # FPDT over P ranks: chunk-interleaved shards of 4-token chunks; each layer's chunk goes
    # through the all-to-all and attends to the K/V history of every rank's earlier chunks.
    # 13 over 2: shards of 7, chunks 4 + 3 (the last group split evenly); 29 over 4: shards
    # of 8; 10 over 4: one chunk of 3. With --offload the final norm runs as a token-wise block.
    # With --offload, packed documents are refused by name: their ids are rebuilt for the whole
    # sequence from contiguous shards only.
    packed = ["--packed", PACKED[1]] if extra else []
    results = launch(tmp_path, P, "--P", P, "--model", "llama", "--lengths", *lengths, "--layers", 4, *extra, *packed)
    assert_exact(results, lengths)
    for r in results:
        if packed:
            assert "contiguous shards only" in r["packed"].get("error", ""), r["packed"]
    kinds = [k for _, k, _ in results[-1]["rewrites"]]
    assert kinds.count("pipelined layer -> Ulysses all-to-all per chunk (K/V history of all ranks)") == 2, kinds
    assert kinds.count("decoder layer -> chunked along T (K/V history fwd, dK/dV bwd)") == 2, kinds


@pytest.mark.slow
def test_attention_outside_a_pipelined_layer_is_put_in_sequence_order_with_its_sinks(tmp_path):
    # Layers written inline in one forward are not pipelined, but the shards are still
    # interleaved for the pipelined layers' sake: each whole-shard attention gathers them and
    # orders them by global position around the attention. Its attention is gpt-oss's eager
    # spelling (a sink logit per query head): each rank gets the sinks of the heads the
    # all-to-all gave it.
    results = launch(tmp_path, 2, "--P", 2, "--model", "inline", "--lengths", 13, "--layers", 4)
    assert_exact(results, [13])
    kinds = [k for _, k, _ in results[1]["rewrites"]]
    assert kinds.count("attention -> Ulysses all-to-all (heads <-> sequence)") == 2 and not any("decoder layer" in k for k in kinds), kinds
    assert kinds.count("matmul-softmax-matmul -> chunked_attention+offload (sinks)") == 2, kinds


@pytest.mark.parametrize("P,T,Q", [(2, 13, 4), (4, 29, 4), (4, 10, 4), (3, 40, 5), (2, 4, 8)])
def test_interleaved_layout_is_a_permutation_put_back_in_order(P, T, Q):
    from longctx_compiler.runtime.sequence_parallel import SequenceGroup, interleaved_to_sequence, sequence_to_interleaved, shard_positions

    L = SequenceGroup(P, 0, None, "t").shard_length(T)
    i = torch.arange(L)
    positions = [shard_positions(i, L, Q, P, r) for r in range(P)]
    everything = torch.cat(positions)
    assert sorted(everything.tolist()) == list(range(P * L))
    for r, pos in enumerate(positions):
        for c in range(-(-L // Q)):
            chunk = pos[c * Q:(c + 1) * Q]
            n = len(chunk)  # local chunk c holds n consecutive tokens, right after rank r-1's
            assert chunk.tolist() == list(range(c * P * Q + r * n, c * P * Q + (r + 1) * n))
    x = torch.randn(2, P * L, 3)
    gathered = torch.cat([x[:, p] for p in positions], dim=1)
    assert torch.equal(interleaved_to_sequence(gathered, 1, Q, P), x)
    assert torch.equal(sequence_to_interleaved(x, 1, Q, P), gathered)


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
        "scans on interleaved shards": (["--P", 2, "--model", "jamba", "--layers", 4], "turn off layers.enabled"),
        "fully sharded weights": (["--P", 2, "--fsdp"], "does not compose with FSDP"),
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


def test_a_scan_with_packed_documents_is_refused():
    # A reset at a shard boundary is not carried across ranks: refused by name, never a
    # scan that mixes the documents on one rank's shard.
    from longctx_compiler.nn.ssm import selective_scan_fn

    class Documents(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.ones(4, 2))

        def forward(self, u, delta, B, C, seq_idx):  # [B, T, ...] inputs, the scan's [B, ..., T] layout
            t = lambda x: x.transpose(1, 2)
            return selective_scan_fn(t(u), t(delta), self.A, t(B), t(C), seq_idx=seq_idx).sum()

    u, delta = torch.randn(1, 8, 4), torch.rand(1, 8, 4)
    B, C = torch.randn(1, 8, 2), torch.randn(1, 8, 2)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"packed documents \(seq_idx\) is not sharded"):
        lc.explain(Documents(), u, delta, B, C, seq_idx, config=lc.Config(distributed={"sequence_parallel": 2}))
