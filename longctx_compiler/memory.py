"""Memory meters: how much memory one training step really needs.

:func:`measure_step` runs a callable once (typically forward + loss + backward of a model,
compiled or not) and reports, in a :class:`StepMemory`:

* ``peak_bytes`` — the high-water mark of bytes resident on the compute device during the
  step, **above** what was resident when the step began (inputs, parameters, optimizer state
  that exist before the step are not counted; what the step allocates and still holds at its
  end, e.g. gradients created by the first backward, is).
* ``saved_for_backward_bytes`` — the activations autograd saved for backward during the
  step: the total bytes of the *distinct storages* handed to autograd's pack hook
  (:func:`torch.autograd.graph.saved_tensors_hooks`) during the step. A storage saved several
  times (by several ops, or as several views) counts once; a storage freed and a new one
  allocated later at the same address counts twice (they are different storages). Storages
  belonging to parameters (or other leaf tensors requiring grad) are not extra memory and
  are reported apart in ``saved_param_bytes``. Inputs that do not require grad but are saved
  (e.g. ``x`` in ``x * w`` for ``w``'s gradient) count as activations.
  This is the *total* saved during the step, not the peak of the saved live set: in a step
  that runs forward then backward the two coincide (nothing saved is released before the
  backward starts); in a step with several forward/backward rounds they differ.
* ``host_pool_peak_bytes`` — the peak bytes in use in the host-offload pool during the step
  (a separate memory tier: pinned host memory on GPU machines), as the pool itself counts
  them after its peak was reset at the start of the step.

How the device peak is measured:

* **CUDA**: the caching allocator's statistics (``torch.cuda.reset_peak_memory_stats``,
  ``max_memory_allocated() - memory_allocated()`` at the start). Host-pool memory is host
  memory and does not appear there.
* **CPU**: the PyTorch profiler with ``profile_memory=True`` records one allocation event per
  CPU allocation and free (``alloc_size`` negative for frees), compiled code included (Inductor's
  C++ kernels allocate through the same allocator). The events are replayed in time order into
  a live-bytes timeline whose maximum is the peak. The sizes are the exact requested byte
  counts (the CPU allocator does not round), so the result is exact, not an estimate.
  Allocations at addresses owned by the host pool (``pool.data_ptrs()``) belong to the host
  tier and are left out of the device timeline.
  One difference from CUDA: the profiler cannot report the size of a block allocated before
  it started, so freeing memory that existed before the step (old gradients dropped by
  ``zero_grad(set_to_none=True)`` inside the step, inputs released by the step) does not
  lower the level: the CPU peak is then an upper bound. Drop such memory before the step
  to get the exact figure.

The saved-tensor hook returns a detached alias of its input (same storage, same version
counter, no copy), so measuring never changes what the step computes or allocates. (Returning
the tensor itself would make a saved *output* reference its own ``grad_fn`` from Python, a
reference cycle through C++ that the garbage collector cannot break; autograd itself saves
outputs without their ``grad_fn`` for the same reason.)

Hooks do not nest: if the step installs its own ``saved_tensors_hooks`` (``save_on_cpu``,
non-reentrant ``torch.utils.checkpoint``), the tensors those inner hooks pack are not seen here
— which is right for checkpointing (they are recomputed, not kept) and means ``save_on_cpu``'d
tensors count as host memory, not as saved activations.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = ["StepMemory", "measure_step", "MIB"]

logger = logging.getLogger("longctx_compiler")

#: Bytes in one mebibyte; every human-readable number in this module is in MiB.
MIB = 1 << 20


@dataclass(frozen=True)
class StepMemory:
    """Memory one step needed (see the module docstring for exact definitions).

    Attributes:
        peak_bytes: peak bytes resident on ``device`` during the step above the bytes resident
            when it began.
        saved_for_backward_bytes: total bytes of distinct non-parameter storages that autograd
            saved for backward during the step (the activations).
        saved_param_bytes: total bytes of distinct saved storages that belong to parameters or
            other leaf tensors requiring grad (already resident; not extra memory).
        host_pool_peak_bytes: peak bytes in use in the host-offload pool during the step
            (0 when there is no pool).
        device: the device whose peak was measured, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    peak_bytes: int
    saved_for_backward_bytes: int
    saved_param_bytes: int
    host_pool_peak_bytes: int
    device: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: every byte count, plus the same values in MiB (``*_mib``)."""
        out: dict[str, Any] = asdict(self)
        for key in ("peak_bytes", "saved_for_backward_bytes", "saved_param_bytes", "host_pool_peak_bytes"):
            out[key.replace("_bytes", "_mib")] = round(getattr(self, key) / MIB, 3)
        return out

    def __str__(self) -> str:
        return (
            f"step memory on {self.device}: peak {_mib(self.peak_bytes)} above start, "
            f"saved for backward {_mib(self.saved_for_backward_bytes)} "
            f"(+ {_mib(self.saved_param_bytes)} of parameters), "
            f"host pool peak {_mib(self.host_pool_peak_bytes)}"
        )


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


# ------------------------------------------------------------------------------------------
# saved-for-backward accounting
# ------------------------------------------------------------------------------------------


class _SavedTensorMeter:
    """Counts the distinct storages autograd packs while installed (a context manager).

    Storages are told apart by address *and* identity: PyTorch keeps one Python object per
    live storage, so a weak reference to it tells whether a storage seen earlier at the same
    address is still the same storage or a new one allocated after the old one was freed.
    """

    def __init__(self, param_storages: set[tuple[str, int]]):
        self._param_storages = param_storages
        # (device, data_ptr) -> list of [weakref to storage, nbytes, is_param], newest last.
        self._seen: dict[tuple[str, int], list[list[Any]]] = {}
        self._skipped = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "_SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        if self._skipped:
            logger.debug("measure_step: %d saved tensors without a real storage were not counted", self._skipped)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            # Fake/meta tensors (tracing), sparse tensors and wrapper subclasses have no data
            # storage of their own; there is nothing resident to count.
            self._skipped += 1
            return t.detach()
        key = (str(t.device), ptr)
        is_param = isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad) or key in self._param_storages
        entries = self._seen.setdefault(key, [])
        if entries and entries[-1][0]() is storage:
            # The same storage saved again (another op, or another view of it).
            entries[-1][2] = entries[-1][2] or is_param
        else:
            entries.append([weakref.ref(storage), nbytes, is_param])
        # A detached alias: same storage and version counter, no copy (see module docstring).
        return t.detach()

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def totals(self) -> tuple[int, int]:
        """``(activation_bytes, param_bytes)`` over every distinct storage packed so far."""
        act = par = 0
        for entries in self._seen.values():
            for _ref, nbytes, is_param in entries:
                if is_param:
                    par += nbytes
                else:
                    act += nbytes
        return act, par


# ------------------------------------------------------------------------------------------
# host pool
# ------------------------------------------------------------------------------------------


def _default_host_pool() -> Any:
    try:
        from longctx_compiler.runtime.host_pool import get_default_pool
    except ImportError:
        return None
    return get_default_pool()


def _check_pool(pool: Any) -> None:
    missing = [a for a in ("bytes_in_use", "peak_bytes", "reset_peak") if not hasattr(pool, a)]
    if missing:
        raise TypeError(
            f"host_pool must expose bytes_in_use, peak_bytes and reset_peak() (like "
            f"longctx_compiler.runtime.host_pool.get_default_pool()); {type(pool).__name__} lacks {', '.join(missing)}"
        )


def _pool_peak(pool: Any) -> int:
    if pool is None:
        return 0
    # A property on the real pool; tolerate a method on duck-typed ones.
    value = pool.peak_bytes
    return int(value() if callable(value) else value)


def _pool_ptrs(pool: Any) -> set[int]:
    """Start addresses of the pool's host buffers, or an empty set if it cannot say."""
    if pool is None:
        return set()
    fn = getattr(pool, "data_ptrs", None)
    if fn is None:
        return set()
    return {int(p) for p in fn()}


# ------------------------------------------------------------------------------------------
# CPU timeline
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AllocEvent:
    time_ns: int
    size: int  # bytes; negative for a free
    ptr: int


def _allocation_events(prof: Any, device_type: str = "cpu") -> list[_AllocEvent]:
    """Every allocation/free event the profiler recorded on ``device_type``, in time order."""
    from torch._C._profiler import _EventType

    events: list[_AllocEvent] = []
    # Iterative walk: allocation events hang under the op that allocated, at any depth.
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            ef = e.extra_fields
            if ef.device.type == device_type and ef.alloc_size != 0:
                events.append(_AllocEvent(e.start_time_ns, int(ef.alloc_size), int(ef.ptr)))
        stack.extend(e.children)
    events.sort(key=lambda ev: ev.time_ns)
    return events


def _replay(events: list[_AllocEvent], pool_ptrs: set[int]) -> int:
    """Replay allocation events into a live-bytes timeline; return its maximum.

    The running total starts at 0 (the level when the step began) and counts the bytes
    allocated during the step and not yet freed, host-pool buffers excluded. Memory that
    existed before the step and is freed during it never lowers the total: the profiler
    cannot size it reliably (see the module docstring).

    A buffer is the pool's when its address is among the pool's buffers at the end of the step
    and it is still live then; an earlier allocation at the same address that was freed during
    the step was an ordinary tensor that happened to use that address first.
    """
    # First pass: the allocation event (by index) still live at the end, per address.
    live_at_end: dict[int, int] = {}
    for i, ev in enumerate(events):
        if ev.size > 0:
            live_at_end[ev.ptr] = i
        else:
            live_at_end.pop(ev.ptr, None)
    pool_allocs = {i for ptr, i in live_at_end.items() if ptr in pool_ptrs}

    running = peak = 0
    live: set[int] = set()
    for i, ev in enumerate(events):
        # Pool buffers are live at the end, so they have no free event to skip as well.
        if i in pool_allocs:
            continue
        if ev.size > 0:
            live.add(ev.ptr)
        elif ev.ptr in live:
            live.discard(ev.ptr)
        else:
            # A free of a block allocated before the step. The profiler's size table can
            # remember a block from an earlier profiling session at the same address (with a
            # stale size), so such frees are ignored consistently rather than trusted.
            continue
        running += ev.size
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Drop the profiler's own start/stop lines from stderr; anything else written is kept."""
    import os
    import sys
    import tempfile

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        # stderr is not a real file (a notebook, pytest's capture): nothing reaches a console.
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if b"profiler_start" not in line and b"profiler_stop" not in line]
            if kept:
                os.write(fd, b"".join(kept))


def _measure_cpu(step: Callable[[], Any], pool: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    if torch.autograd.profiler._is_profiler_enabled:
        raise RuntimeError(
            "measure_step cannot run on CPU inside another torch.profiler session: "
            "it needs its own profiler to see allocations; measure outside the profiler"
        )
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False, with_stack=False)
    # Starting and stopping the profiler makes its C++ side write "profiler_start/stop" lines
    # straight to file descriptor 2; keep them out of the user's console (the step itself runs
    # with stderr untouched).
    with _without_profiler_chatter():
        prof.start()
    try:
        step()
    finally:
        with _without_profiler_chatter():
            prof.stop()
    events = _allocation_events(prof, "cpu")
    peak = _replay(events, _pool_ptrs(pool))
    logger.debug("measure_step: %d CPU allocation events, device peak %d B", len(events), peak)
    return peak


def _measure_cuda(step: Callable[[], Any], dev: torch.device) -> int:
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    step()
    # Kernels run asynchronously; the allocator's counters are updated at launch time, but
    # synchronising makes the step's end well defined (and surfaces asynchronous errors here).
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - start


# ------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise ValueError(f"measure_step measures 'cpu' or 'cuda' devices, not {dev.type!r}")
    return dev


def _param_storage_keys(parameters: Iterable[torch.Tensor] | torch.nn.Module | None) -> set[tuple[str, int]]:
    if parameters is None:
        return set()
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    keys = set()
    for p in parameters:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must be tensors or an nn.Module, got an element of type {type(p).__name__}")
        keys.add((str(p.device), p.untyped_storage().data_ptr()))
    return keys


def measure_step(
    step: Callable[[], Any],
    *,
    device: str | torch.device | None = None,
    host_pool: Any = None,
    parameters: Iterable[torch.Tensor] | torch.nn.Module | None = None,
) -> StepMemory:
    """Run ``step()`` once and measure the memory it needed.

    Args:
        step: a callable with no arguments, typically ``lambda: model(x).loss.backward()``.
            Its return value is discarded. Run it once before measuring if it compiles, or
            the compiler's own allocations count too.
        device: the compute device to measure, ``"cpu"`` or ``"cuda[:N]"``; default CUDA when
            available, else CPU.
        host_pool: the host-offload pool to account as a separate tier: any object with
            ``bytes_in_use``, ``peak_bytes`` and ``reset_peak()``, and optionally
            ``data_ptrs() -> set[int]`` (start addresses of its host buffers, needed on CPU to
            tell its buffers apart from device memory). Default: the process-wide pool of
            :mod:`longctx_compiler.runtime.host_pool` when that module is available.
        parameters: tensors (or a module whose parameters) to count as parameters when saved
            for backward, in addition to what is recognisable by itself (``nn.Parameter``
            instances and leaf tensors requiring grad). Useful when a compiled region saves a
            detached alias of a parameter.

    Returns:
        a :class:`StepMemory`.

    Raises:
        ValueError: for a device other than CPU/CUDA, or CUDA without CUDA.
        TypeError: if ``step`` is not callable or ``host_pool`` lacks the pool interface.
        RuntimeError: on CPU when a torch profiler is already running (they do not nest).
    """
    if not callable(step):
        raise TypeError(f"step must be a callable taking no arguments, got {type(step).__name__}")
    dev = _resolve_device(device)
    pool = _default_host_pool() if host_pool is None else host_pool
    if pool is not None:
        _check_pool(pool)
        pool.reset_peak()
    meter = _SavedTensorMeter(_param_storage_keys(parameters))
    with meter:
        if dev.type == "cuda":
            peak = _measure_cuda(step, dev)
        else:
            peak = _measure_cpu(step, pool)
    activations, params = meter.totals()
    pool_peak = _pool_peak(pool)
    return StepMemory(
        peak_bytes=int(peak),
        saved_for_backward_bytes=activations,
        saved_param_bytes=params,
        host_pool_peak_bytes=pool_peak,
        device=str(dev),
    )
