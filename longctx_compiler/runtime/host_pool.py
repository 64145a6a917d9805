"""A budgeted pool of reusable host buffers, and asynchronous device↔host copies.

Long-context attention keeps its saved activations (q, k, v, out, lse) on the host between
forward and backward (FPDT). Allocating pinned memory is slow and fragments, so buffers come
from a :class:`HostPool`: they are keyed by ``(numel, dtype)`` and go back to a free list when
released, so the next layer (or the next step) with the same shapes reuses them.

* CUDA available: buffers are pinned; :meth:`HostPool.offload` copies device→host on a side
  *copy stream* (after the copy stream waits for the producing stream), records an event and
  guards the source with ``record_stream``; :meth:`HostPool.prefetch_async` copies host→device
  on the copy stream and returns a :class:`PendingCopy` whose ``wait()`` makes the *current*
  stream wait on the copy's event. Nothing here calls ``torch.cuda.synchronize()``; the only
  host-side waits are on a buffer's last-use event, right before that buffer is reused.
* CPU only: the same bookkeeping with plain CPU buffers; copies are synchronous. The pool is a
  separately accounted memory tier: ``bytes_in_use`` counts what live handles hold.

The byte budget (``max_bytes``) bounds ``bytes_reserved`` (live + cached free buffers); when a
request does not fit even after dropping cached free buffers, :class:`HostMemoryError` says how
much was needed and what to change.

Budgets per request: ``offload(t, max_bytes=N)`` / ``acquire(..., max_bytes=N)`` count the
buffer against an *account* keyed by the budget ``N``: the live bytes of requests made with
budget ``N`` stay within ``N`` (and before a fresh buffer is allocated for such a request, cached
free buffers are dropped until that account's live bytes + the cache fit in ``N`` too). The
budget travels with each call (an op argument), so nothing is written into the process-wide
pool's settings: two models with different budgets, or one with a budget and one without, share
the pool, its buffers and its accounting, and each is held to its own bound. The pool's own
``max_bytes`` (None for the default pool) still bounds everything together.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HostMemoryError",
    "HostPool",
    "HostHandle",
    "PendingCopy",
    "get_default_pool",
    "set_default_pool",
]


class HostMemoryError(RuntimeError):
    """The host pool's byte budget cannot hold a requested buffer."""


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return int(numel) * torch.empty((), dtype=dtype).element_size()


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@dataclass(eq=False)  # identity semantics: buffers live in a WeakSet
class _Buffer:
    """One host allocation: a flat tensor, and the CUDA event of its last pending copy."""

    data: Tensor
    last_use: Any = None  # torch.cuda.Event or None
    account: int | None = None  # the per-request budget it was handed out under, if any

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def wait_idle(self) -> None:
        # Before a buffer is rewritten, copies still reading/writing it must finish; this waits
        # on that one event only (host side), never on the whole device.
        if self.last_use is not None:
            self.last_use.synchronize()
            self.last_use = None


@dataclass
class HostHandle:
    """A tensor's host copy, held in a pool buffer until :meth:`release`.

    Attributes:
        shape, dtype: of the offloaded tensor.
        device: where it came from (and where :meth:`HostPool.prefetch` puts it back).
        host: the host copy, ``shape``-shaped view of the pool buffer (valid until release;
            on CUDA only after ``ready`` has completed).
        ready: CUDA event recorded after the device→host copy, or None on CPU.
    """

    pool: "HostPool"
    buffer: _Buffer | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    ready: Any = None
    released: bool = field(default=False)

    @property
    def host(self) -> Tensor:
        if self.released or self.buffer is None:
            raise RuntimeError("HostHandle: this handle was released; its host buffer may already be reused")
        return self.buffer.data[: self.numel].view(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return _nbytes(self.numel, self.dtype)

    def release(self) -> None:
        """Give the host buffer back to the pool's free list (idempotent)."""
        if not self.released:
            self.released = True
            buf, self.buffer = self.buffer, None
            self.pool._give_back(buf)


class PendingCopy:
    """A host→device copy in flight; :meth:`wait` returns the device tensor.

    ``wait()`` enqueues a wait on the copy's event in the *current* CUDA stream (no host
    synchronisation), so kernels launched afterwards on that stream see the data. Issue the
    copy for chunk ``n + 1`` before computing on chunk ``n`` and call ``wait()`` only when
    chunk ``n + 1`` is needed: that is double buffering.
    """

    def __init__(self, tensor: Tensor, event: Any = None):
        self._tensor = tensor
        self._event = event

    def wait(self) -> Tensor:
        if self._event is not None:
            torch.cuda.current_stream(self._tensor.device).wait_event(self._event)
            self._event = None
        return self._tensor


class HostPool:
    """Reusable host buffers under a byte budget, with accounting.

    Args:
        max_bytes: upper bound on ``bytes_reserved`` (live + cached free buffers); ``None``
            means unbounded.
        pin_memory: pin buffers (needed for truly asynchronous copies). Default: pinned
            exactly when CUDA is available.

    Accounting (all in bytes): ``bytes_in_use`` (held by live handles/acquired buffers),
    ``bytes_reserved`` (in use + cached in the free list), ``peak_bytes`` (max of
    ``bytes_in_use`` since construction or :meth:`reset_peak`). Thread-safe.
    """

    def __init__(self, max_bytes: int | None = None, *, pin_memory: bool | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"HostPool: max_bytes must be a non-negative int or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._free: dict[tuple[int, torch.dtype], list[_Buffer]] = defaultdict(list)
        # Every buffer the pool owns (handed out or cached), so memory meters can tell the
        # host tier apart from device allocations on CPU, where both are CPU memory.
        self._owned: "weakref.WeakSet[_Buffer]" = weakref.WeakSet()
        self._lock = threading.RLock()
        self._in_use = 0
        self._reserved = 0
        self._peak = 0
        self._copy_streams: dict[int, Any] = {}
        self._groups: dict[int, dict[str, HostHandle]] = {}
        self._group_ids = itertools.count(1)
        # Live bytes per request budget (see the module docstring), keyed by the budget.
        self._account_in_use: dict[int, int] = defaultdict(int)
        self.reuse_count = 0  # how many acquisitions were served from the free list

    # ---------------------------------------------------------------- accounting
    @property
    def bytes_in_use(self) -> int:
        return self._in_use

    @property
    def bytes_reserved(self) -> int:
        return self._reserved

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def bytes_in_use_for(self, max_bytes: int) -> int:
        """Live bytes held by requests made with the per-request budget ``max_bytes``."""
        with self._lock:
            return self._account_in_use.get(int(max_bytes), 0)

    def data_ptrs(self) -> set[int]:
        """Start addresses of every host buffer the pool holds (in use or cached)."""
        with self._lock:
            return {b.data.untyped_storage().data_ptr() for b in self._owned}

    def reset_peak(self) -> None:
        """Restart peak tracking from the current ``bytes_in_use``."""
        with self._lock:
            self._peak = self._in_use

    # ---------------------------------------------------------------- buffers
    def acquire(self, numel: int, dtype: torch.dtype, *, max_bytes: int | None = None) -> _Buffer:
        """A flat host buffer of ``numel`` elements of ``dtype`` (reused when one is free).

        Args:
            max_bytes: a per-request budget (see the module docstring): the live bytes of
                requests with this same budget, this one included, must fit in it.
        Raises:
            HostMemoryError: when the pool's budget or ``max_bytes`` cannot hold it even after
                dropping cached free buffers.
        """
        _check_budget(max_bytes, "HostPool.acquire")
        key = (int(numel), dtype)
        need = _nbytes(numel, dtype)
        with self._lock:
            account = self._account_in_use.get(max_bytes, 0) if max_bytes is not None else 0
            if max_bytes is not None and account + need > max_bytes:
                raise self._budget_error(need, numel, dtype, max_bytes, account, per_request=True)
            free = self._free.get(key)
            # The budget bounds what live offloaded tensors hold, whether the buffer is new or
            # reused from the cache (the budget may have been lowered since it was cached).
            over_budget = self.max_bytes is not None and self._in_use + need > self.max_bytes
            if free and not over_budget:
                buf = free.pop()
                self.reuse_count += 1
            else:
                if self.max_bytes is not None and self._reserved + need > self.max_bytes:
                    # Cached buffers of other sizes are only a cache: drop them before failing.
                    self._trim(self._reserved + need - self.max_bytes)
                if max_bytes is not None:
                    cached = self._reserved - self._in_use
                    if account + cached + need > max_bytes:
                        # A budgeted request's new buffer must not grow the host memory past its
                        # budget by way of the cache either.
                        self._trim(account + cached + need - max_bytes)
                if self.max_bytes is not None and (over_budget or self._reserved + need > self.max_bytes):
                    raise self._budget_error(need, numel, dtype, self.max_bytes, self._in_use, per_request=False)
                data = torch.empty(int(numel), dtype=dtype, pin_memory=self.pin_memory)
                buf = _Buffer(data)
                self._owned.add(buf)
                self._reserved += need
            buf.account = max_bytes
            self._in_use += need
            if max_bytes is not None:
                self._account_in_use[max_bytes] += need
            self._peak = max(self._peak, self._in_use)
        buf.wait_idle()
        return buf

    def _budget_error(self, need: int, numel: int, dtype: torch.dtype, budget: int, held: int, *, per_request: bool) -> HostMemoryError:
        what = "this budget" if per_request else "the pool's budget"
        knob = ("the budget (attention.host_pool_bytes for optimize(); host_pool_bytes= for the op)" if per_request
                else "the pool's max_bytes")
        return HostMemoryError(
            f"host pool budget exceeded: need {_fmt(need)} more for a buffer of {numel} x {dtype}, "
            f"but {_fmt(held)} of {what} of {_fmt(budget)} is held by live offloaded tensors "
            f"({_fmt(self._reserved)} reserved in the pool). Raise max_bytes, i.e. {knob} (at least "
            f"{_fmt(held + need)}), offload fewer layers, use a smaller batch/sequence, "
            f"or make sure every forward with offload=True is followed by its backward so "
            f"handles are released."
        )

    def _give_back(self, buf: _Buffer | None) -> None:
        if buf is None:
            return
        with self._lock:
            self._in_use -= buf.nbytes
            if buf.account is not None:
                left = self._account_in_use[buf.account] - buf.nbytes
                if left:
                    self._account_in_use[buf.account] = left
                else:
                    del self._account_in_use[buf.account]
                buf.account = None
            self._free[(buf.data.numel(), buf.data.dtype)].append(buf)

    def _trim(self, nbytes: int) -> int:
        freed = 0
        for key in list(self._free):
            bufs = self._free[key]
            while bufs and freed < nbytes:
                b = bufs.pop()
                b.wait_idle()
                freed += b.nbytes
            if not bufs:
                del self._free[key]
            if freed >= nbytes:
                break
        self._reserved -= freed
        return freed

    def empty_cache(self) -> int:
        """Drop every cached free buffer; returns the bytes given back."""
        with self._lock:
            return self._trim(self._reserved)

    def clear(self) -> None:
        """Release every stashed handle group and drop the cache.

        Use when graphs holding offload handles are discarded without running backward
        (their finalizers normally do this) or between independent runs.
        """
        with self._lock:
            groups, self._groups = self._groups, {}
        for g in groups.values():
            for h in g.values():
                h.release()
        self.empty_cache()

    # ---------------------------------------------------------------- copies
    def _copy_stream(self, device: torch.device):
        idx = device.index if device.index is not None else torch.cuda.current_device()
        s = self._copy_streams.get(idx)
        if s is None:
            s = torch.cuda.Stream(device=idx)
            self._copy_streams[idx] = s
        return s

    def offload(self, tensor: Tensor, *, max_bytes: int | None = None) -> HostHandle:
        """Copy ``tensor`` into a pool buffer; asynchronous on CUDA (copy stream + event).

        ``max_bytes``: the per-request budget the copy counts against (see :meth:`acquire`).
        """
        if not isinstance(tensor, Tensor):
            raise TypeError(f"HostPool.offload: expected a Tensor, got {type(tensor).__name__}")
        buf = self.acquire(tensor.numel(), tensor.dtype, max_bytes=max_bytes)
        handle = HostHandle(self, buf, tensor.shape, tensor.dtype, tensor.device)
        dst = buf.data[: tensor.numel()].view(tensor.shape)
        if tensor.is_cuda:
            stream = self._copy_stream(tensor.device)
            # The copy must start after the kernels that produced `tensor` on the compute stream.
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                dst.copy_(tensor, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            # The caching allocator must not hand `tensor`'s memory out again before the copy
            # stream has read it, even if the caller drops `tensor` right away.
            tensor.record_stream(stream)
            handle.ready = ev
            buf.last_use = ev
        else:
            dst.copy_(tensor)
        return handle

    def prefetch_async(self, handle: HostHandle, start: int | None = None, stop: int | None = None, *, dim: int = 2) -> PendingCopy:
        """Start copying ``handle``'s host data (optionally ``[start:stop]`` along ``dim``) back.

        On CPU the result is a view of the host buffer (no copy; read it before releasing the
        handle). On CUDA it is a fresh device tensor written by the copy stream.
        """
        src = handle.host
        if start is not None or stop is not None:
            src = src.narrow(dim, start or 0, (stop if stop is not None else src.shape[dim]) - (start or 0))
        if handle.device.type != "cuda":
            return PendingCopy(src)
        stream = self._copy_stream(handle.device)
        # Allocated on the compute stream, which is where it is consumed and freed.
        dst = torch.empty(src.shape, dtype=src.dtype, device=handle.device)
        with torch.cuda.stream(stream):
            if handle.ready is not None:
                stream.wait_event(handle.ready)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        dst.record_stream(stream)
        handle.buffer.last_use = ev
        return PendingCopy(dst, ev)

    def prefetch(self, handle: HostHandle, start: int | None = None, stop: int | None = None, *, dim: int = 2) -> Tensor:
        """:meth:`prefetch_async` followed by ``wait()``: usable by the current stream at once."""
        return self.prefetch_async(handle, start, stop, dim=dim).wait()

    # ---------------------------------------------------------------- handle groups
    def stash(self, handles: dict[str, HostHandle]) -> int:
        """Register a group of handles under a fresh integer id (what an op can return)."""
        with self._lock:
            gid = next(self._group_ids)
            self._groups[gid] = handles
        return gid

    def lookup(self, gid: int) -> dict[str, HostHandle]:
        with self._lock:
            g = self._groups.get(int(gid))
        if g is None:
            raise RuntimeError(
                f"HostPool: offload handle {int(gid)} is unknown or already released; each forward with "
                f"offload=True serves backward only while its autograd graph is alive"
            )
        return g

    def release_group(self, gid: int) -> None:
        """Release every handle of group ``gid`` (idempotent)."""
        with self._lock:
            g = self._groups.pop(int(gid), None)
        if g:
            for h in g.values():
                h.release()

    def release_when_collected(self, owner: Any, gid: int) -> None:
        """Release group ``gid`` when ``owner`` (e.g. the handle-id tensor) is garbage collected."""
        weakref.finalize(owner, _release_group_ref, weakref.ref(self), gid)

    @property
    def live_groups(self) -> int:
        return len(self._groups)


def _check_budget(max_bytes: Any, where: str) -> None:
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"{where}: max_bytes must be a non-negative int (bytes) or None, got {max_bytes!r}")


def _release_group_ref(pool_ref, gid: int) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.release_group(gid)


_default_pool: HostPool | None = None
_default_lock = threading.Lock()


def get_default_pool() -> HostPool:
    """The process-wide pool (unbounded unless replaced with :func:`set_default_pool`)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = HostPool()
        return _default_pool


def set_default_pool(pool: HostPool) -> HostPool:
    """Replace the process-wide pool (e.g. with a budgeted one); returns the previous one."""
    global _default_pool
    if not isinstance(pool, HostPool):
        raise TypeError(f"set_default_pool: expected a HostPool, got {type(pool).__name__}")
    with _default_lock:
        prev, _default_pool = _default_pool, pool
    return prev
