"""longctx_compiler.nn's Mamba-2 layer: Mamba-2's arithmetic, one SSD node per layer when compiled."""

import pytest
import torch
import torch.nn.functional as F

from longctx_compiler.kernels.ssd import ssd_reference
from longctx_compiler.nn import GatedRMSNorm, Mamba2Mixer, TinyMamba2LM
from longctx_compiler.testing import assert_exact

# ssd_scan calls the op's overload packet; the compiler's passes take either spelling.
SSD = (torch.ops.longctx.ssd_fwd, torch.ops.longctx.ssd_fwd.default)


def test_mixer_is_mamba2_arithmetic():
    # The layer written out step by step with the sequential SSD reference (float64).
    torch.manual_seed(0)
    m = Mamba2Mixer(8, d_state=4, d_conv=3, expand=2, headdim=4, ngroups=2, chunk_size=5, dtype=torch.float64)
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    T, H, P, G, N = 13, m.nheads, m.headdim, m.ngroups, m.d_state
    zxbcdt = x @ m.in_proj.weight.T
    z, xBC, dt = zxbcdt.split([m.d_inner, m.conv_dim, H], -1)
    xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (2, 0)), m.conv1d.weight, m.conv1d.bias, groups=m.conv_dim)).transpose(1, 2)
    xs, B, C = xBC.split([m.d_inner, G * N, G * N], -1)
    y = ssd_reference(xs.reshape(2, T, H, P), dt, -torch.exp(m.A_log), B.reshape(2, T, G, N), C.reshape(2, T, G, N),
                      D=m.D, dt_bias=m.dt_bias, dt_softplus=True)
    h = (y.reshape(2, T, -1) * F.silu(z)).reshape(2, T, G, -1)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(2, T, -1) * m.norm.weight
    assert_exact(m(x), h @ m.out_proj.weight.T, name="mixer")


def test_gated_norm_matches_transformers_mamba2():
    gated = pytest.importorskip("transformers.models.mamba2.modeling_mamba2").MambaRMSNormGated
    ours, theirs = GatedRMSNorm(12, 4, eps=1e-6), gated(12, group_size=4, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    y, z = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    torch.testing.assert_close(ours(y, z), theirs(y, z))


def test_compiled_graph_has_one_ssd_node_per_layer_and_is_exact():
    torch.manual_seed(1)
    model = TinyMamba2LM(vocab_size=32, d_model=8, n_layers=2, d_state=4, headdim=4, chunk_size=4, dtype=torch.float64)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(0, 32, (2, 11))
    compiled = torch.compile(model, backend=backend, dynamic=True)
    assert_exact(compiled(ids, ids).loss, model(ids, ids).loss, name="loss")
    assert len(graphs) == 1
    assert len([n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target in SSD]) == 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(8, expand=2, headdim=5)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Mixer(8, expand=2, headdim=4, ngroups=3)
