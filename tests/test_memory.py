"""Tests for the step memory meter: exact byte counts on steps whose allocations are known."""

from __future__ import annotations

import gc
import json
import time
import weakref

import pytest
import torch

from longctx_compiler.memory import MIB, StepMemory, measure_step

F32 = 4
#: float32 elements in one MiB
N_MIB = MIB // F32


def _cpu(step, **kw) -> StepMemory:
    return measure_step(step, device="cpu", **kw)


class FakePool:
    """A stand-in for the host-offload pool: flat host buffers, counted in use while held."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.bytes_in_use = 0
        self.peak_bytes = 0

    def reset_peak(self) -> None:
        self.peak_bytes = self.bytes_in_use

    def data_ptrs(self) -> set[int]:
        return {b.untyped_storage().data_ptr() for b in self.buffers}

    def alloc(self, numel: int) -> torch.Tensor:
        buf = torch.empty(numel, dtype=torch.float32)
        self.buffers.append(buf)
        self.bytes_in_use += buf.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_in_use)
        return buf

    def drop_all(self) -> None:
        self.bytes_in_use = 0
        self.buffers.clear()


# ------------------------------------------------------------------------------ device peak


def test_peak_is_exact_for_known_allocations():
    def step():
        a = torch.empty(N_MIB)
        del a
        b = torch.empty(N_MIB)
        c = torch.empty(N_MIB)
        del b, c

    m = _cpu(step, host_pool=FakePool())
    assert m.peak_bytes == 2 * MIB
    assert m.device == "cpu"


def test_cpu_does_not_credit_frees_of_memory_from_before_the_step():
    # The profiler cannot size blocks allocated before it started, so their frees are
    # invisible: the CPU peak is the bytes allocated in the step (an upper bound here).
    held = [torch.empty(N_MIB)]

    def step():
        held.pop()
        held.append(torch.empty(N_MIB // 2))

    assert _cpu(step, host_pool=FakePool()).peak_bytes == MIB // 2


def test_memory_kept_after_the_step_counts():
    kept = []

    def step():
        kept.append(torch.empty(N_MIB))
        tmp = torch.empty(N_MIB // 4)
        del tmp

    assert _cpu(step, host_pool=FakePool()).peak_bytes == MIB + MIB // 4


def _two_matmuls(x, w1, w2):
    return (x @ w1) @ w2


def test_aot_eager_compiled_intermediate_is_seen():
    x, w1, w2 = torch.randn(64, 128), torch.randn(128, 256), torch.randn(256, 32)
    f = torch.compile(_two_matmuls, backend="aot_eager", fullgraph=True)
    f(x, w1, w2)  # compile outside the measurement
    out = []
    m = _cpu(lambda: out.append(f(x, w1, w2)), host_pool=FakePool())
    # [64, 256] intermediate and the [64, 32] output are alive together at the second mm.
    assert m.peak_bytes == 64 * 256 * F32 + 64 * 32 * F32


@pytest.mark.slow
def test_inductor_compiled_intermediate_is_seen():
    x, w1, w2 = torch.randn(64, 128), torch.randn(128, 256), torch.randn(256, 32)
    f = torch.compile(_two_matmuls, backend="inductor", fullgraph=True)
    t0 = time.perf_counter()
    f(x, w1, w2)
    if time.perf_counter() - t0 > 60:
        pytest.skip("Inductor compile too slow on this machine")
    out = []
    m = _cpu(lambda: out.append(f(x, w1, w2)), host_pool=FakePool())
    # Inductor's C++ wrapper allocates the same two buffers through the CPU allocator.
    assert m.peak_bytes == 64 * 256 * F32 + 64 * 32 * F32


# ------------------------------------------------------------------------- saved tensors


def test_saved_activations_exact_eager():
    x = torch.randn(256, 256)
    w = torch.nn.Parameter(torch.randn(256, 256))
    nbytes = 256 * 256 * F32

    def step():
        (x * w).sin().sum().backward()

    m = _cpu(step, host_pool=FakePool())
    # mul saves x (for w's gradient); sin saves its input x * w. w itself is not needed.
    assert m.saved_for_backward_bytes == 2 * nbytes
    assert m.saved_param_bytes == 0
    assert w.grad is not None


def test_saved_parameters_are_reported_apart():
    w1 = torch.nn.Parameter(torch.randn(128, 128))
    w2 = torch.randn(128, 128, requires_grad=True)  # a leaf requiring grad counts as a parameter
    nbytes = 128 * 128 * F32

    m = _cpu(lambda: (w1 * w2).exp().sum().backward(), host_pool=FakePool())
    # mul saves both leaves; exp saves its output (one activation).
    assert m.saved_param_bytes == 2 * nbytes
    assert m.saved_for_backward_bytes == nbytes


def test_aot_eager_saved_tensors_are_seen_through_the_compiled_region():
    x = torch.randn(256, 256)
    w = torch.nn.Parameter(torch.randn(256, 256))
    f = torch.compile(lambda x: (x * w).sin(), backend="aot_eager")
    f(x).sum().backward()
    nbytes = 256 * 256 * F32

    m = _cpu(lambda: f(x).sum().backward(), host_pool=FakePool())
    # AOTAutograd's partitioner saves x and w and recomputes x * w in backward.
    assert m.saved_for_backward_bytes == nbytes
    assert m.saved_param_bytes == nbytes


def test_explicit_parameters_argument():
    w = torch.randn(64, 64, requires_grad=True)
    wd = w.detach()  # an alias that autograd cannot recognise as the parameter

    def step():
        s = torch.ones((), requires_grad=True)
        # mul saves wd (for s's gradient) and nothing else.
        (wd * s).sum().backward()

    plain = _cpu(step, host_pool=FakePool())
    told = _cpu(step, host_pool=FakePool(), parameters=[w])
    assert plain.saved_param_bytes == 0 and told.saved_param_bytes == 64 * 64 * F32
    assert plain.saved_for_backward_bytes == 64 * 64 * F32 and told.saved_for_backward_bytes == 0


def test_saved_storage_counted_once_and_reused_addresses_counted_again():
    x = torch.randn(256, 256)
    w = torch.nn.Parameter(torch.randn(256, 256))
    nbytes = 256 * 256 * F32

    def once():
        a = x * w
        # a is saved by both sin and cos: one storage, counted once.
        (a.sin() + a.cos() + a[:128].repeat(2, 1) * w).sum().backward()

    one = _cpu(once, host_pool=FakePool())
    # Activations: x (first mul), a (sin, cos), repeat's output r (second mul, for w's
    # gradient); the second mul also saves w, a parameter.
    assert one.saved_for_backward_bytes == 3 * nbytes
    assert one.saved_param_bytes == nbytes

    def twice():
        once()
        once()

    two = _cpu(twice, host_pool=FakePool())
    # The second round's storages are new storages (even where the allocator reuses
    # addresses); x is the same storage in both rounds.
    assert two.saved_for_backward_bytes == 5 * nbytes


def test_measurement_does_not_change_the_step():
    x = torch.randn(32, 32, requires_grad=True)

    def grads():
        x.grad = None
        x.exp().sin().sum().backward()
        return x.grad.clone()

    expected = grads()
    got = []
    _cpu(lambda: got.append(grads()), host_pool=FakePool())
    assert torch.equal(got[0], expected)


def test_saved_outputs_are_not_leaked():
    # exp saves its own output; the hook must not create a cycle output -> grad_fn -> output.
    x = torch.randn(32, requires_grad=True)
    refs = []

    def step():
        y = x.exp()
        refs.append(weakref.ref(y))

    _cpu(step, host_pool=FakePool())
    gc.collect()
    assert refs[0]() is None


# ------------------------------------------------------------------------------ host tier


def test_host_pool_buffers_are_a_separate_tier():
    pool = FakePool()

    def step():
        pool.alloc(N_MIB)  # 1 MiB host buffer, kept by the pool
        tmp = torch.empty(N_MIB // 2)
        del tmp

    m = _cpu(step, host_pool=pool)
    assert m.peak_bytes == MIB // 2
    assert m.host_pool_peak_bytes == MIB


def test_host_pool_buffer_released_during_step_does_not_change_device_level():
    pool = FakePool()
    # An earlier profiling session that saw a block at the address the pool will get leaves
    # a stale size entry in the profiler; its free must still not be credited.
    _cpu(lambda: pool.alloc(N_MIB), host_pool=pool)
    pool.drop_all()
    pool.alloc(N_MIB)
    pool.reset_peak()

    def step():
        pool.drop_all()  # frees a pool buffer that existed before the step
        tmp = torch.empty(N_MIB // 2)
        del tmp

    m = _cpu(step, host_pool=pool)
    assert m.peak_bytes == MIB // 2
    assert m.host_pool_peak_bytes == MIB  # in use at the start of the step


def test_default_pool_is_used_when_importable(monkeypatch):
    import longctx_compiler.memory as memory

    pool = FakePool()
    monkeypatch.setattr(memory, "_default_host_pool", lambda: pool)
    m = measure_step(lambda: pool.alloc(N_MIB), device="cpu")
    assert (m.peak_bytes, m.host_pool_peak_bytes) == (0, MIB)


# ------------------------------------------------------------------------ API and errors


def test_report_formats():
    m = StepMemory(peak_bytes=3 * MIB, saved_for_backward_bytes=MIB, saved_param_bytes=MIB // 2, host_pool_peak_bytes=0, device="cpu")
    j = m.to_json()
    json.dumps(j)
    assert j["peak_bytes"] == 3 * MIB and j["peak_mib"] == 3.0 and j["saved_param_mib"] == 0.5
    assert "peak 3.00 MiB" in str(m) and "saved for backward 1.00 MiB" in str(m)
    with pytest.raises(Exception):
        m.peak_bytes = 0  # frozen


def test_bad_arguments():
    with pytest.raises(TypeError, match="callable"):
        measure_step(42)
    with pytest.raises(ValueError, match="cpu"):
        measure_step(lambda: None, device="meta")
    with pytest.raises(TypeError, match="reset_peak"):
        measure_step(lambda: None, device="cpu", host_pool=object())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_step(lambda: None, device="cuda")


def test_nested_profiler_is_refused():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]):
        with pytest.raises(RuntimeError, match="profiler"):
            measure_step(lambda: None, device="cpu", host_pool=FakePool())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_and_saved():
    dev = torch.device("cuda")
    x = torch.randn(256, 256, device=dev)
    w = torch.nn.Parameter(torch.randn(256, 256, device=dev))
    keep = []

    def step():
        a = torch.empty(N_MIB, device=dev)
        del a
        b = torch.empty(N_MIB, device=dev)
        c = torch.empty(N_MIB, device=dev)
        del b, c

    m = measure_step(step, device="cuda", host_pool=FakePool())
    # 1 MiB is a multiple of the caching allocator's 512-byte rounding: exact.
    assert m.peak_bytes == 2 * MIB
    assert m.device.startswith("cuda")

    m = measure_step(lambda: keep.append((x * w).sin().sum().backward()), device="cuda", host_pool=FakePool())
    assert m.saved_for_backward_bytes == 2 * 256 * 256 * F32
    assert m.saved_param_bytes == 0
    assert m.peak_bytes >= 2 * 256 * 256 * F32
