"""longctx_compiler.nn: eager = plain PyTorch; under torch.compile one canonical scan node."""

import torch

from longctx_compiler.kernels.selective_scan import selective_scan_reference
from longctx_compiler.kernels.selective_scan.schema import ScanArgs
from longctx_compiler.nn import CANONICAL_CHUNK, SelectiveSSM, TinyMambaLM, selective_scan_fn
from longctx_compiler.testing import assert_exact, make_tensor

SCAN = torch.ops.longctx.selective_scan_fwd.default


def _capture(model, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(model, backend=backend, dynamic=True)(*args)
    return out, graphs


def test_eager_selective_scan_fn_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (make_tensor((2, 3, 6), seed=gen) for _ in range(3))
    A = make_tensor((3, 2), seed=gen, low=-1, high=-0.1)
    B, C = make_tensor((2, 2, 6), seed=gen), make_tensor((2, 2, 6), seed=gen)
    y, h = selective_scan_fn(u, delta, A, B, C, None, z, None, True, None, return_final_state=True)
    y_r, h_r = selective_scan_reference(u, delta, A, B, C, None, z, None, True, None, return_final_state=True)
    assert torch.equal(y, y_r) and torch.equal(h, h_r)


def test_dynamo_graph_has_one_canonical_node_per_layer():
    model = TinyMambaLM(vocab_size=32, d_model=8, n_layers=2, d_state=4, dtype=torch.float64)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    _, graphs = _capture(model, ids, ids)
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is SCAN]
    assert len(nodes) == 2
    for n in nodes:
        args = ScanArgs.of(n)
        assert args.delta_softplus is True and args.h0 is None
        assert (args.chunk_size, args.mode, args.window) == (CANONICAL_CHUNK, "exact", 0)


def test_compiled_model_matches_eager_float64():
    torch.manual_seed(0)
    model = TinyMambaLM(vocab_size=32, d_model=8, n_layers=2, d_state=4, dtype=torch.float64)
    ids = torch.randint(0, 32, (2, 11))
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    params = list(model.parameters())
    # (assert_gradients_match keys a compiled module's parameters with an "_orig_mod." prefix,
    # so the comparison is written out here.)
    loss_e = model(ids, ids).loss
    loss_c = compiled(ids, ids).loss
    assert_exact(loss_c, loss_e, name="loss")
    for p, ge, gc in zip(params, torch.autograd.grad(loss_e, params), torch.autograd.grad(loss_c, params)):
        assert_exact(gc, ge, name=f"grad {tuple(p.shape)}")
    # A new length reuses the dynamic graph and stays exact.
    ids2 = torch.randint(0, 32, (1, 23))
    assert_exact(compiled(ids2).logits, model(ids2).logits, name="logits T=23")


def test_selective_ssm_stays_in_module_dtype():
    for dtype in (torch.float64, torch.float32):
        layer = SelectiveSSM(8, d_state=4, dtype=dtype)
        x = torch.randn(2, 5, 8, dtype=dtype)
        out = layer(x)
        assert out.shape == x.shape and out.dtype == dtype
        assert all(p.dtype == dtype for p in layer.parameters())
