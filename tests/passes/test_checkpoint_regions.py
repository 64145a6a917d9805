"""The passes inside activation-checkpoint regions (``torch.utils.checkpoint``, Hugging Face's
``gradient_checkpointing_enable()``).

The regions are opened for the passes and closed again: every test checks that the rewrite
fired inside them, that the result equals eager autograd in float64 (loss and every
gradient), and that the regions still exist and still recompute in backward. Sites in bodies
of other higher-order ops are refused with the op's name, never dropped.
"""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_of
from longctx_compiler.kernels.attention import op as attention_op
from longctx_compiler.nn import TinyMambaLM
from longctx_compiler.passes import Pass
from longctx_compiler.nn.ssm import TinyLMOutput
from longctx_compiler.passes.checkpoint_regions import OFFLOAD_IN_REGION, PASS_NAME
from longctx_compiler.report import iter_nodes
from longctx_compiler.runtime import get_default_pool
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, make_tensor

ATTN = "chunked_attention"
CHECKPOINT = "higher_order.tag_activation_checkpoint"
CHUNKED = "longctx.chunked_attention_fwd.default"
OFFLOADED = "longctx.chunked_attention_fwd_offload.default"


class Attention(nn.Module):
    """Causal self-attention through SDPA's ``is_causal=True`` (no mask to prove)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, dtype=torch.float64)
        self.o = nn.Linear(d, d, dtype=torch.float64)
        self.heads = heads

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


class Checkpointed(nn.Module):
    """``layers`` attention layers, each one a non-reentrant checkpoint region (what
    ``gradient_checkpointing_enable()`` does to a decoder stack)."""

    def __init__(self, layers=2, seed=0, context_fn=None, use_checkpoint=True):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Attention() for _ in range(layers))
        self.context_fn = context_fn
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for layer in self.layers:
            if not self.use_checkpoint:
                x = layer(x)
            elif self.context_fn is None:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = checkpoint(layer, x, use_reentrant=False, context_fn=self.context_fn)
        return x


def optimized(model, chunk=8, offload=False):
    return lc.optimize(model, backend="aot_eager", strict=True, attention={"chunk_size": chunk, "offload": offload})


def inputs(t, seed=0):
    return [make_tensor((2, t, 16), seed=seed, dtype=torch.float64)]


def regions(snapshot):
    """``[(region node, targets inside its body (nested bodies included))]``."""
    return [(n, [m.target for m in iter_nodes(n.subgraph)]) for n in snapshot.nodes
            if n.subgraph is not None and any(u.target == CHECKPOINT for u in snapshot.nodes if n.name in u.inputs)]


@pytest.fixture
def attention_runs(monkeypatch):
    """How often the chunked attention forward ran (forward and recomputation alike)."""
    calls = {"fwd": 0}
    impl = attention_op._forward_impl

    def counting(*a, **k):
        calls["fwd"] += 1
        return impl(*a, **k)

    monkeypatch.setattr(attention_op, "_forward_impl", counting)
    return calls


def test_attention_in_checkpoint_regions_is_rewritten_exactly_for_every_length():
    eager, opt = Checkpointed(), optimized(Checkpointed())

    @settings(max_examples=8, deadline=None)
    @given(t=st.integers(2, 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        assert_gradients_match(eager, opt, inputs(t, seed), rtol=EXACT_RTOL)
        # The rewrite fired in every layer's region.
        assert opt.report.count(ATTN) == 2
        assert not opt.report.refusals

    prop()
    assert opt.compile_count == 1
    assert [r.site.split(" ")[0] for r in opt.report.rewrites] == ["layers.0", "layers.1"]
    # The regions are still there, one per layer, each holding its chunked attention.
    after = opt.report.graphs[0].after
    found = regions(after)
    assert len(found) == 2 and all(body.count(CHUNKED) == 1 for _, body in found)
    assert not any(n.target == CHUNKED for n in after.nodes), "the op left its region"


def test_regions_still_recompute_in_backward(attention_runs):
    # A checkpoint region saves only its inputs: the attention inside runs again in backward
    # (twice per layer per step), exactly as plain checkpointing does. Without regions it runs once.
    x = inputs(13)
    opt = optimized(Checkpointed())
    opt(*x).sum().backward()
    assert opt.report.count(ATTN) == 2
    assert attention_runs["fwd"] == 4

    attention_runs["fwd"] = 0
    plain = optimized(Checkpointed(use_checkpoint=False))
    plain(*x).sum().backward()
    assert plain.report.count(ATTN) == 2
    assert attention_runs["fwd"] == 2


def test_a_selective_policy_of_the_user_is_kept(attention_runs):
    # The user's policy saves our op's outputs: then nothing recomputes it, which shows the
    # region came back with the body's policy (Dynamo keeps it in the body's metadata).
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(op)
        is_ours = op in (torch.ops.longctx.chunked_attention_fwd.default,)
        return CheckpointPolicy.MUST_SAVE if is_ours else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    eager, opt = Checkpointed(context_fn=context_fn), optimized(Checkpointed(context_fn=context_fn))
    assert_gradients_match(eager, opt, inputs(11), rtol=EXACT_RTOL)
    assert opt.report.count(ATTN) == 2
    assert torch.ops.longctx.chunked_attention_fwd.default in seen
    attention_runs["fwd"] = 0
    opt(*inputs(11)).sum().backward()
    assert attention_runs["fwd"] == 2


def test_offload_op_is_not_recomputed_inside_a_region():
    # Recomputing the host-offload op in backward would copy q/k/v/out/lse to the host pool a
    # second time; inside a region nothing is kept between forward and backward, so the plain
    # op is used and the report says why.
    pool = get_default_pool()
    eager, opt = Checkpointed(), optimized(Checkpointed(), offload=True)
    offloads = []
    original = pool.offload

    def counting(t):
        offloads.append(t.shape)
        return original(t)

    pool.offload = counting
    try:
        assert_gradients_match(eager, opt, inputs(17, 3), rtol=EXACT_RTOL)
    finally:
        del pool.offload
    assert offloads == []
    assert opt.report.count(ATTN) == 2
    for r in opt.report.rewrites:
        assert r.kind == "sdpa -> chunked_attention"
        assert r.details["offload"] is False and r.details["offload_refused"] == OFFLOAD_IN_REGION
    targets = [t for _, body in regions(opt.report.graphs[0].after) for t in body]
    assert targets.count(CHUNKED) == 2 and OFFLOADED not in targets


def test_offload_stays_on_outside_regions():
    opt = optimized(Checkpointed(use_checkpoint=False), offload=True)
    opt(*inputs(9)).sum().backward()
    assert [r.kind for r in opt.report.rewrites] == ["sdpa -> chunked_attention+offload"] * 2
    assert all("offload_refused" not in r.details for r in opt.report.rewrites)


class MaskOutside(nn.Module):
    """The mask is built once, outside the checkpointed layers, and passed in (as Hugging
    Face models do): the prover inside a region must see its producer."""

    def __init__(self, padded=None):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(Attention() for _ in range(2))
        self.padded = padded  # None, "keys" (padded keys removed) or "pairs" (padded queries too)

    def forward(self, x, keep_tokens):
        t = x.shape[1]
        idx = torch.arange(t, device=x.device)
        mask = (idx[None, None, None, :] <= idx[None, None, :, None]).expand(x.shape[0], 1, t, t)
        if self.padded:
            mask = mask & keep_tokens[:, None, None, :].bool()
        if self.padded == "pairs":
            mask = mask & keep_tokens[:, None, :, None].bool()
        for layer in self.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False)
        return x


def test_mask_built_outside_the_regions_is_proven_causal():
    eager, opt = MaskOutside(), optimized(MaskOutside())
    for t in (6, 21):
        x = inputs(t, t) + [torch.ones(2, t, dtype=torch.long)]
        assert_gradients_match(eager, opt, x, rtol=EXACT_RTOL)
        assert opt.report.count(ATTN) == 2
        assert all(r.details["causal"] for r in opt.report.rewrites)
    assert opt.compile_count == 1


def _holes():
    keep = torch.ones(2, 12, dtype=torch.long)
    keep[0, 5:7] = 0  # padding inside the sequence: every query still sees a key
    return keep


def test_a_key_padding_mask_built_outside_the_regions_is_proven_per_region():
    eager, opt = MaskOutside(padded="keys"), optimized(MaskOutside(padded="keys"))
    assert_gradients_match(eager, opt, inputs(12) + [_holes()], rtol=EXACT_RTOL)
    rewrites = [r for r in opt.report.rewrites if r.pass_name == ATTN]
    assert [r.site.split(" ")[0] for r in rewrites] == ["layers.0", "layers.1"]
    assert all(r.details["key_padding"] for r in rewrites)


def test_a_mask_the_prover_refuses_is_reported_per_region():
    # Padded queries masked too (their rows see no key): not a causal mask over real keys.
    eager, opt = MaskOutside(padded="pairs"), optimized(MaskOutside(padded="pairs"))
    assert_gradients_match(eager, opt, inputs(12) + [_holes()], rtol=EXACT_RTOL)
    assert opt.report.count(ATTN) == 0
    refused = [r for r in opt.report.refusals if r.pass_name == ATTN]
    assert [r.site.split(" ")[0] for r in refused] == ["layers.0", "layers.1"]
    assert all("mask not proven causal" in r.reason for r in refused)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = Attention(), Attention()

    def inner(self, x):
        return self.b(checkpoint(self.a, x, use_reentrant=False))

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def test_nested_regions_are_opened_and_closed_in_place():
    eager, opt = Nested(), optimized(Nested())
    assert_gradients_match(eager, opt, inputs(14, 5), rtol=EXACT_RTOL)
    assert opt.report.count(ATTN) == 2
    (outer, outer_body), = regions(opt.report.graphs[0].after)
    (inner, inner_body), = regions(outer.subgraph)
    # b's attention sits in the outer region; a's in the region nested in it.
    assert outer_body.count(CHUNKED) == 2 and inner_body.count(CHUNKED) == 1


class CondModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.attn = Attention()

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.attn(x), lambda x: 2 * self.attn(x), (x,))


def test_sites_in_bodies_the_passes_do_not_enter_are_refused_with_the_op_name():
    # torch.cond's branches are bodies of another higher-order op: never silently dropped.
    report = lc.explain(CondModel(), *inputs(10), config=lc.Config(backend="aot_eager"))
    assert report.count(ATTN) == 0
    refused = [r for r in report.refusals if r.pass_name == ATTN]
    assert len(refused) == 2  # one per branch
    assert all("higher_order.cond" in r.reason and r.site.startswith("attn") for r in refused)


class CheckpointedMamba(TinyMambaLM):
    """TinyMambaLM with each mixer in a user checkpoint region."""

    def forward(self, input_ids, labels=None):
        h = self.embedding(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + checkpoint(mixer, norm(h), use_reentrant=False)
        logits = self.lm_head(self.norm_f(h))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return TinyLMOutput(loss, logits)


@pytest.mark.parametrize("shard_blocks", [False, True])
def test_ssm_passes_inside_user_regions(shard_blocks):
    # The scan passes, and the block passes that build their own regions or ops, compose
    # with a user's checkpoint region around each mixer.
    def tiny():
        torch.manual_seed(0)
        return CheckpointedMamba(vocab_size=64, d_model=16, n_layers=2, d_state=4, dtype=torch.float64)

    eager = tiny()
    opt = lc.optimize(tiny(), backend="aot_eager", strict=True, lm_loss={"enabled": False},
                      ssm={"chunk_size": 8, "shard_blocks": shard_blocks})
    assert_gradients_match(eager, opt, [ids_for(13, 1)], loss_fn=loss_of, call=lm_call, rtol=1e-9)
    done = {r.pass_name for r in opt.report.rewrites}
    assert {"adjoint_sharded_scan", "adjoint_sharded_blocks" if shard_blocks else "recompute_ssm_blocks"} <= done, opt.report
    assert len(regions(opt.report.graphs[0].after)) >= 2
    assert not [r for r in opt.report.refusals if r.pass_name == PASS_NAME]


# -- Hugging Face Llama with gradient_checkpointing_enable() ------------------------------------
transformers = pytest.importorskip("transformers")


def llama(attn="sdpa", layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64)
    with warnings.catch_warnings():
        # transformers 5.24 deprecates the name (for activation_checkpointing_enable, same
        # behaviour); it is still what Trainer and most training scripts call.
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    model.train()
    return model


def optimized_llama(model):
    return lc.optimize(model, backend="aot_eager", strict=True, lm_loss={"enabled": False},
                       attention={"chunk_size": 8, "offload": True})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gradient_checkpointing_never_loses_a_site(attn):
    # Every layer's attention is either rewritten or refused with a reason: none disappears
    # into the checkpoint regions.
    eager, opt = llama(attn), optimized_llama(llama(attn))
    ids = ids_for(12, 0)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=EXACT_RTOL if attn == "sdpa" else 1e-5)
    sites = [r.site for r in opt.report.rewrites if r.pass_name == ATTN] + [r.site for r in opt.report.refusals if r.pass_name == ATTN]
    assert sorted(s.split(" ")[0] for s in sites) == ["model.layers.0.self_attn", "model.layers.1.self_attn"], opt.report
    # one graph: transformers' once-only warning about use_cache and checkpointing no longer
    # breaks it (the sites keep their full module paths)
    assert len(opt.report.graphs) == 1
    assert not [r for r in opt.report.refusals if r.pass_name == PASS_NAME]


@pytest.mark.parametrize("attn, rtol", [("sdpa", EXACT_RTOL), ("eager", 1e-5)])
def test_llama_gradient_checkpointing_rewrites_every_layer(attn, rtol):
    eager, opt = llama(attn), optimized_llama(llama(attn))
    for t in (9, 20):
        ids = ids_for(t, t)
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=rtol)
        assert opt.report.count(ATTN) == 2, opt.report
    rewrites = [r for r in opt.report.rewrites if r.pass_name == ATTN]
    assert all(r.details["offload"] is False and r.details["offload_refused"] == OFFLOAD_IN_REGION for r in rewrites)
    # The layers are still checkpoint regions, each with its chunked attention inside.
    graph = next(g for g in opt.report.graphs if any(n.target == CHECKPOINT for n in g.after.nodes))
    assert [body.count(CHUNKED) for _, body in regions(graph.after)] == [1, 1]


# -- the region machinery on captured graphs ------------------------------------------------------
def capture(model, *args):
    """The Dynamo graph of ``model(*args)`` (and its example inputs), as the backend gets it."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend)(*args)
    (found,) = seen
    return found


def run(gm, example_inputs, passes=None):
    from longctx_compiler.passes.base import PassContext, run_passes
    from longctx_compiler.passes.registry import pipeline
    from longctx_compiler.report import RewriteReport

    config = lc.Config(backend="aot_eager", attention={"chunk_size": 4, "offload": False})
    record = RewriteReport().new_graph(gm)
    run_passes(gm, pipeline(config) if passes is None else passes, PassContext(config, tuple(example_inputs)), record)
    return record


def hops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.tag_activation_checkpoint]


def test_a_region_used_as_a_whole_is_not_entered_and_its_sites_are_refused():
    import operator

    gm, example_inputs = capture(Checkpointed(layers=1), *inputs(7))
    (hop,) = hops(gm)
    # Read the HOP's result as a tuple rather than element by element: the region cannot be
    # inlined and outlined again without changing that.
    (getter,) = hop.users
    with gm.graph.inserting_after(hop):
        as_tuple = gm.graph.call_function(tuple, (hop,))
    with gm.graph.inserting_after(as_tuple):
        whole = gm.graph.call_function(operator.getitem, (as_tuple, 0))
    getter.replace_all_uses_with(whole)
    gm.graph.erase_node(getter)
    gm.recompile()
    record = run(gm, example_inputs)
    assert not record.rewrites
    (not_entered,) = [r for r in record.refusals if r.pass_name == PASS_NAME]
    assert "not entered" in not_entered.reason and "used as a whole" in not_entered.reason
    (hidden,) = [r for r in record.refusals if r.pass_name == ATTN]
    assert "higher_order.tag_activation_checkpoint" in hidden.reason and hidden.site.startswith("layers.0")
    assert len(hops(gm)) == 1


class Interleave(Pass):
    """Test-only: routes a region's attention output through a node outside the region and
    back in, so that the region can no longer become one node (done while matching; it
    matches nothing)."""

    name = "test_interleave"

    def match(self, gm, ctx):
        sdpa = next(n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention)
        with gm.graph.inserting_after(sdpa):
            outside = gm.graph.call_function(torch.mul, (sdpa, 1.0))
        outside.meta["example_value"] = sdpa.meta["example_value"]
        sdpa.replace_all_uses_with(outside, delete_user_cb=lambda u: u is not outside)
        return []


def test_a_region_that_cannot_be_outlined_again_stays_inlined_with_a_refusal():
    gm, example_inputs = capture(Checkpointed(layers=1), *inputs(7))
    expected = gm(*example_inputs)
    record = run(gm, example_inputs, passes=[Interleave()])
    (kept,) = [r for r in record.refusals if r.pass_name == PASS_NAME]
    assert "kept inlined" in kept.reason and "interleaved" in kept.reason and kept.site.startswith("layers.0")
    assert hops(gm) == []
    # The same program, run without the region.
    torch.testing.assert_close(gm(*example_inputs), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiles_the_closed_regions():
    # The outlined regions, with our op inside, go through Inductor's own handling of
    # checkpoint regions (its partitioner recomputes them) like the regions Dynamo made.
    torch._inductor.config.force_disable_caches = True
    eager = Checkpointed()
    opt = lc.optimize(Checkpointed(), backend="inductor", strict=True, attention={"chunk_size": 8, "offload": True})
    for t in (11, 26):
        assert_gradients_match(eager, opt, inputs(t, t), rtol=EXACT_RTOL)
        assert opt.report.count(ATTN) == 2
    assert len(regions(opt.report.graphs[0].after)) == 2
