"""Config validation: bad input fails at the call site with a message that says what to do."""

import pytest
import torch

import longctx_compiler as lc
from longctx_compiler import AttentionConfig, Config, SSMConfig


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.backend == "inductor" and cfg.strict is False
    assert cfg.attention.chunk_size is None and cfg.ssm.mode == "exact"  # None: chosen from T at run time
    with pytest.raises(Exception):
        cfg.backend = "aot_eager"  # frozen


@pytest.mark.parametrize(
    "build, error, words",
    [
        (lambda: AttentionConfig(chunk_size=-4), ValueError, "positive"),
        (lambda: AttentionConfig(chunk_size=0), ValueError, "positive"),
        (lambda: AttentionConfig(chunk_size=2.5), TypeError, "int"),
        (lambda: AttentionConfig(offload="yes"), TypeError, "True or False"),
        (lambda: SSMConfig(chunk_size=-1), ValueError, "positive"),
        (lambda: SSMConfig(mode="approximate"), ValueError, "exact"),
        (lambda: SSMConfig(mode="truncated"), ValueError, "window"),
        (lambda: SSMConfig(window=8), ValueError, "truncated"),
        (lambda: Config(backend="tvm"), ValueError, "unknown backend"),
        (lambda: Config(attention={"chunk": 4}), TypeError, "no field"),
        (lambda: Config(attention=3), TypeError, "AttentionConfig"),
        (lambda: Config(extra_passes=(object(),)), TypeError, "Pass"),
        (lambda: Config().replace(chunk_size=4), TypeError, "no field"),
        # Each error names the field's own unit, and wrong types are TypeErrors everywhere.
        (lambda: AttentionConfig(host_pool_bytes=0), ValueError, "positive number of bytes"),
        (lambda: AttentionConfig(host_pool_bytes=-1), ValueError, "bytes"),
        (lambda: SSMConfig(chunk_size=0), ValueError, "time steps"),
        (lambda: Config(sequence_dim="1"), TypeError, "sequence_dim must be an int"),
        (lambda: Config(sequence_dim=True), TypeError, "sequence_dim must be an int"),
        (lambda: Config(sequence_dim=-1), ValueError, "non-negative"),
    ],
)
def test_invalid_values_raise_clear_errors(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_replace_updates_nested_fields():
    cfg = Config().replace(attention={"chunk_size": 64}, backend="aot_eager")
    assert cfg.attention.chunk_size == 64 and cfg.attention.offload is True
    assert cfg.backend == "aot_eager"
    assert SSMConfig(mode="truncated", window=16).window == 16


def test_optimize_rejects_bad_input():
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        lc.optimize(42)
    with pytest.raises(TypeError, match="instantiate"):
        lc.optimize(torch.nn.Linear)
    with pytest.raises(ValueError, match="unknown backend"):
        lc.optimize(torch.nn.Linear(2, 2), backend="xla")
    with pytest.raises(TypeError, match="no field"):
        lc.optimize(torch.nn.Linear(2, 2), chunk=3)
    with pytest.raises(ValueError, match="positive"):
        lc.optimize(torch.nn.Linear(2, 2), attention={"chunk_size": -8})
    with pytest.raises(TypeError, match="Config"):
        lc.optimize(torch.nn.Linear(2, 2), config={"backend": "aot_eager"})
    with pytest.raises(TypeError, match="already optimized"):
        lc.optimize(lc.optimize(torch.nn.Linear(2, 2)))


def test_sequence_dim_beyond_every_input_warns_once():
    import warnings

    import torch

    import longctx_compiler as lc

    f = lc.optimize(lambda x: (x * 2).sum(), backend="aot_eager", sequence_dim=3)
    with pytest.warns(UserWarning, match="sequence_dim=3, but no tensor input has that dimension"):
        f(torch.randn(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(torch.randn(2, 5))  # told once per optimized object
    g = lc.optimize(lambda x: (x * 2).sum(), backend="aot_eager", sequence_dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(torch.randn(2, 5))
