"""The causal-mask prover: proves causal masks for every length, refuses everything else."""

import pytest
import torch

from longctx_compiler.passes.causal_mask import NotProvable, prove_causal


def capture(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            torch._dynamo.mark_dynamic(a, 1)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = graphs
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]


def hf_style(x, offset=0, cmp="le", big=torch.finfo(torch.float64).min):
    t = x.shape[1]
    q_idx = torch.arange(t) + offset
    kv_idx = torch.arange(t) + 0
    qi = q_idx[None, None, :, None]
    ki = kv_idx[None, None, None, :]
    keep = {"le": ki <= qi, "lt": ki < qi, "ge_rev": qi >= ki}[cmp]
    keep = keep.expand(x.shape[0], -1, t, t)
    return (torch.where(keep, torch.zeros((), dtype=torch.float64), big),)


X = torch.zeros(2, 9)


def test_transformers_spelling_is_proven_causal():
    prove_causal(capture(hf_style, X), additive=True)
    prove_causal(capture(lambda x: hf_style(x, cmp="ge_rev"), X), additive=True)
    prove_causal(capture(lambda x: hf_style(x, big=-float("inf")), X), additive=True)


def test_boolean_and_masked_fill_spellings():
    def boolean(x):
        t = x.shape[1]
        i = torch.arange(t).unsqueeze(1)
        j = torch.arange(t).unsqueeze(0)
        return (~(j > i),)

    def filled(x):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        return (torch.zeros(t, t, dtype=torch.float64).masked_fill(j > i, float("-inf")),)

    prove_causal(capture(boolean, X), additive=False)
    with pytest.raises(NotProvable):
        # a boolean keep-mask read as additive values is not causal masking
        prove_causal(capture(boolean, X), additive=True)
    prove_causal(capture(filled, X), additive=True)


@pytest.mark.parametrize(
    "fn, words",
    [
        (lambda x: hf_style(x, cmp="lt"), "not causal"),  # strictly-lower: diagonal masked
        (lambda x: hf_style(x, offset=1), "not causal"),  # shifted by one (cache offset)
        (lambda x: hf_style(x, big=-10.0), "adds -10"),  # soft mask: not exact masking
    ],
)
def test_non_causal_masks_are_refused(fn, words):
    with pytest.raises(NotProvable, match=words):
        prove_causal(capture(fn, X), additive=True)


def test_sliding_window_and_padding_masks_are_refused():
    def window(x):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        keep = (j <= i) & (j > i - 4)
        return (keep,)

    def padding(x, pad):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        return ((j <= i) & pad[:, None, :].bool(),)

    with pytest.raises(NotProvable, match="not causal"):
        prove_causal(capture(window, X), additive=False)
    with pytest.raises(NotProvable, match="input tensor"):
        prove_causal(capture(padding, X, torch.ones(2, 9)), additive=False)
