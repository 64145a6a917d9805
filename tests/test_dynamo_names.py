"""Dynamo's source spellings → the attribute paths users write (one helper, every variant)."""

import pytest
import torch

import longctx_compiler as lc
from longctx_compiler.dynamo_names import module_path, readable_input_name

SPELLINGS = [
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['args'][0].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['args'].0.model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['kwargs']['model'].layers[1]", "layers.1"),
    ("L['self']._modules['model']._modules['layers']['0']", "model.layers.0"),
    ("L['self'].__dict__['_modules']['base_model'].model.layers[0]", "base_model.model.layers.0"),
    ('L["self"].model.layers[2].mlp', "model.layers.2.mlp"),
    ("getattr(L['self'].layers, '0').mixer", "layers.0.mixer"),
    ("getattr(getattr(L['self'], 'layers'), '3')", "layers.3"),
    ("G['net'].blocks[1]", "net.blocks.1"),
    ("L['model'].layers[0]", "model.layers.0"),
    ("L['self']", ""),
    ("L['args'][0]", ""),
    ("L['fn'].__self__.proj", "__self__.proj"),
]


@pytest.mark.parametrize("source, path", SPELLINGS)
def test_module_path_of_every_spelling(source, path):
    assert module_path(source) == path


@pytest.mark.parametrize(
    "name, readable",
    [
        ("l_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_", "model.layers.0.self_attn.q_proj.weight"),
        ("l_self_modules_lm_head_parameters_weight_", "lm_head.weight"),
        ("l_self_modules_model_modules_rotary_emb_buffers_inv_freq_", "model.rotary_emb.inv_freq"),
        ("l_input_ids_", "input_ids"),
        ("l_args_1_", "args_1"),
    ],
)
def test_readable_input_names(name, readable):
    assert readable_input_name(name) == readable


class Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.silu(self.proj(x))


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Inner(), Inner()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _decorated(fn):
    # The way transformers' forward decorators call the method: self arrives in args.
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Decorated(Outer):
    forward = _decorated(Outer.forward)


@pytest.mark.parametrize("cls", [Outer, Decorated])
def test_report_sites_are_attribute_paths_however_forward_is_reached(cls):
    from silu_test_pass import SiluToCustomOp

    model = lc.optimize(cls(), backend="aot_eager", extra_passes=(SiluToCustomOp(),))
    model(torch.randn(2, 4))
    sites = [r.site for r in model.report.rewrites]
    assert len(sites) == 2
    assert [s.split(" ")[0] for s in sites] == ["layers.0", "layers.1"], sites
    assert not any("L[" in s or "args" in s for s in sites)
