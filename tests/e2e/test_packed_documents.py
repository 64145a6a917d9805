"""``optimize(model, packed_documents=True)``: a packed row computes what its documents
compute alone, for attention (Llama), Mamba-1 and Mamba-2 models and a hybrid of both (Jamba), with the documents given as
``seq_idx``, ``cu_seqlens`` or restarting ``position_ids``.

"Alone" is tested literally: each document is run as its own row (with the positions it has
in the packed row) through transformers' own model, float64, and the packed row's logits and the gradient of every parameter
must equal those runs' — the gradient of the packed mean loss being the token-weighted sum of
the documents' mean losses' gradients (labels ``-100`` at each document's first token, as
transformers' ``DataCollatorWithFlattening`` builds them, so no document predicts the next
one's first token).
"""

import pytest
import torch
import torch.nn.functional as F

import longctx_compiler as lc
from longctx_compiler.backend import PassFailure
from longctx_compiler.runtime.documents import PackedDocumentsError
from longctx_compiler.testing import EXACT_RTOL, relative_error
from lm_helpers import ids_for

transformers = pytest.importorskip("transformers")

VOCAB = 64
#: Block chunk of the SSM models: documents start at, before and after chunk boundaries.
CHUNK = 8
#: Two rows of T = 22: documents of 7, 8 (starting at a chunk boundary), 1 and 6 tokens; 3 and 19.
LAYOUT = ([7, 8, 1, 6], [3, 19])
T = 22


def build(family, seed=0, **extra):
    torch.manual_seed(seed)
    t = transformers
    if family == "llama":
        cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=VOCAB, max_position_embeddings=512, attn_implementation="sdpa", **extra)
        model = t.LlamaForCausalLM(cfg)
    elif family == "jamba":
        # The hybrid: Mamba, attention, Mamba, attention (no experts, no rotary positions).
        model = t.JambaForCausalLM(t.JambaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, expert_layer_offset=99,
            num_experts=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, **extra))
    elif family == "mamba":
        model = t.MambaForCausalLM(t.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, **extra))
    else:
        model = t.Mamba2ForCausalLM(t.Mamba2Config(hidden_size=16, vocab_size=VOCAB, num_hidden_layers=2, state_size=4, num_heads=4,
                                                   head_dim=8, n_groups=2, expand=2, chunk_size=CHUNK, **extra))
    return model.to(torch.float64).train()


def optimized(model, attention=None):
    return lc.optimize(model, backend="aot_eager", packed_documents=True, lm_loss={"enabled": False},
                       attention={"chunk_size": CHUNK, "offload": False, **(attention or {})},
                       ssm={"chunk_size": CHUNK, "block_chunk_size": CHUNK})


def documents(layout):
    """``seq_idx [B, T]`` and ``cu_seqlens`` (over the B·T tokens) of a layout."""
    seq = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in layout])
    lengths = torch.tensor([n for row in layout for n in row])
    return seq, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def restarting_positions(seq):
    """Positions that restart at each document (transformers' packed convention)."""
    pos = torch.zeros_like(seq)
    for b in range(seq.shape[0]):
        for d in seq[b].unique():
            sel = seq[b] == d
            pos[b, sel] = torch.arange(int(sel.sum()))
    return pos


def packed_labels(ids, seq):
    """Labels with -100 at each document's first token: no prediction across a boundary."""
    labels = ids.clone()
    labels[:, 0] = -100
    labels[:, 1:][seq[:, 1:] != seq[:, :-1]] = -100
    return labels


def step(model, ids, labels, **kwargs):
    """``(logits, every parameter's gradient)`` of the summed next-token loss, in float64
    (transformers' own loss casts the logits to float32 first)."""
    model.zero_grad(set_to_none=True)
    head = []
    # The LM head's own output: Mamba2 casts its logits to float32 after it.
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: head.append(out))
    try:
        model(ids, use_cache=False, **kwargs)
    finally:
        hook.remove()
    logits = head[0]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    loss.backward()
    return logits.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def alone(model, ids, seq, positions):
    """Each document run as its own row: ``(logits [B, T, V] put back in place, the summed
    loss's gradients: the sum of the documents')``."""
    logits = torch.empty(*ids.shape, VOCAB, dtype=torch.float64)
    grads = None
    for b in range(ids.shape[0]):
        for d in seq[b].unique().tolist():
            sel = seq[b] == d
            doc = ids[b : b + 1, sel]
            kwargs = {} if positions is None else {"position_ids": positions[b : b + 1, sel]}
            out, g = step(model, doc, doc, **kwargs)
            logits[b, sel] = out[0]
            grads = g if grads is None else [a + x for a, x in zip(grads, g)]
    return logits, grads


#: transformers' Mamba models round to float32 inside a float64 model (their RMS norms, the
#: residual stream): a packed row and its documents alone then differ by float32 round-off
#: (reductions over other token counts); Llama is float64 throughout.
RTOL = {"llama": EXACT_RTOL, "mamba": 1e-5, "mamba2": 1e-5, "jamba": 1e-5}



def packed_call(source, seq, cu, family):
    """``(keyword arguments of the packed call, the positions of its tokens or None)``."""
    if source == "seq_idx":
        kwargs = {"seq_idx": seq}
    elif source == "cu_seqlens":
        kwargs = {"cu_seqlens": cu}
    else:
        kwargs = {"position_ids": restarting_positions(seq)}
    # Llama's rotary positions: the global ones unless the caller restarts them.
    positions = kwargs.get("position_ids")
    if family == "llama" and positions is None:
        positions = torch.arange(seq.shape[1]).expand_as(seq)
    return kwargs, positions


@pytest.mark.parametrize("family, source", [("llama", "seq_idx"), ("llama", "position_ids"), ("mamba", "seq_idx"),
                                            ("mamba", "cu_seqlens"), ("mamba", "position_ids"), ("mamba2", "cu_seqlens"),
                                            ("jamba", "seq_idx")])
def test_a_packed_row_equals_each_document_alone(family, source):
    model = build(family)
    opt = optimized(model)
    seq, cu = documents(LAYOUT)
    ids = ids_for(T, 3)
    kwargs, positions = packed_call(source, seq, cu, family)
    logits, grads = step(opt, ids, packed_labels(ids, seq), **kwargs)
    # The reference: transformers' own model on each document alone.
    ref_logits, ref_grads = alone(model, ids, seq, positions)
    assert relative_error(logits, ref_logits) <= RTOL[family]
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) <= RTOL[family]
    rewrites = opt.report.rewrites
    attention = [r for r in rewrites if r.pass_name == "chunked_attention"]
    assert len(attention) == {"llama": 2, "jamba": 2}.get(family, 0) and all(r.details["documents"] for r in attention)
    if family != "llama":
        assert sum(r.pass_name == "packed_documents" for r in rewrites) == 2  # each layer's scan resets
        convs = [r for r in rewrites if r.pass_name == "depthwise_conv"]
        assert len(convs) == 2 and all("documents" in r.details for r in convs)
        # and every layer still runs chunk by chunk, the documents crossing its chunks
        assert sum(r.pass_name == "adjoint_sharded_blocks" for r in rewrites) == 2
    assert not opt.report.refusals


def test_by_default_the_model_s_own_math_is_kept():
    """transformers' Mamba mixes packed documents (it ignores position_ids): without the option
    so do we; with it the packed row differs from that."""
    model = build("mamba")
    seq, cu = documents(LAYOUT)
    ids = ids_for(T, 5)
    with torch.no_grad():
        positions = restarting_positions(seq)
        mixed = lc.optimize(model, backend="aot_eager", strict=True)(ids, position_ids=positions, use_cache=False).logits
        assert relative_error(mixed, model(ids, use_cache=False).logits) <= RTOL["mamba"]
        kept = optimized(model)(ids, position_ids=positions, use_cache=False).logits
        assert relative_error(mixed, kept) > 1e-3


def test_one_compile_across_lengths_and_layouts():
    opt = optimized(build("mamba"))
    for t, layout in ((22, LAYOUT), (13, ([13], [5, 8])), (30, ([8, 8, 8, 6], [29, 1]))):
        seq, _ = documents(layout)
        ids = ids_for(t, t)
        step(opt, ids, ids, seq_idx=seq)
    assert opt.compile_count == 1


def test_an_attention_left_unrewritten_raises_instead_of_mixing_documents():
    # Attention dropout in training is refused by the attention pass (the random mask would
    # change): with packed documents the model's own SDPA would mix them, so the compile
    # raises even without strict=True, naming the site.
    opt = optimized(build("llama", attention_dropout=0.1))
    seq, _ = documents(LAYOUT)
    ids = ids_for(T, 0)
    with pytest.raises(PassFailure, match=r"packed_documents: an attention the attention pass did not rewrite.*self_attn"):
        opt(ids, seq_idx=seq, use_cache=False)
    off = optimized(build("llama"), attention={"enabled": False})
    with pytest.raises(PassFailure, match="packed_documents cannot fall back"):
        off(ids, seq_idx=seq, use_cache=False)


def test_document_inputs_are_checked():
    opt = optimized(build("mamba"))
    ids = ids_for(T, 0)
    seq, cu = documents(LAYOUT)
    with pytest.raises(PackedDocumentsError, match="rise from 0 to the 44 tokens"):
        opt(ids, cu_seqlens=cu[:-1], use_cache=False)
    with pytest.raises(PackedDocumentsError, match="int32/int64"):
        opt(ids, seq_idx=seq.double(), use_cache=False)
    with pytest.raises(PackedDocumentsError, match=r"expected \[2, 22\]"):
        opt(ids, seq_idx=seq[:, :-1], use_cache=False)
    with pytest.raises(ValueError, match="sequence parallelism"):
        lc.Config(packed_documents=True, distributed={"sequence_parallel": 2})
    with pytest.raises(ValueError, match="sequence_dim=1"):
        lc.Config(packed_documents=True, sequence_dim=0)
