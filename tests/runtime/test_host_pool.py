"""HostPool: budget, reuse, accounting, offload/prefetch round trips (CPU tier)."""

from __future__ import annotations

import pytest
import torch

from longctx_compiler.runtime import HostMemoryError, HostPool, get_default_pool, set_default_pool


def test_offload_prefetch_round_trip_and_accounting():
    pool = HostPool(max_bytes=1 << 20)
    x = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    h = pool.offload(x)
    assert pool.bytes_in_use == x.numel() * 4 == pool.bytes_reserved == pool.peak_bytes
    x.zero_()  # the host copy is a copy, not a view of the source
    back = pool.prefetch(h)
    assert torch.equal(back, torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4))
    assert torch.equal(pool.prefetch(h, 1, 3), back[:, :, 1:3])
    h.release()
    h.release()  # idempotent
    assert pool.bytes_in_use == 0 and pool.bytes_reserved == 96 and pool.peak_bytes == 96
    with pytest.raises(RuntimeError, match="released"):
        h.host


def test_buffers_are_reused_by_numel_and_dtype():
    pool = HostPool()
    h1 = pool.offload(torch.ones(2, 3))
    ptr = h1.host.data_ptr()
    h1.release()
    # Same (numel, dtype), different shape: served from the free list.
    h2 = pool.offload(torch.zeros(3, 2))
    assert h2.host.data_ptr() == ptr and pool.reuse_count == 1
    assert torch.equal(h2.host, torch.zeros(3, 2))
    # Different dtype: a new buffer.
    h3 = pool.offload(torch.zeros(3, 2, dtype=torch.float64))
    assert pool.reuse_count == 1
    assert pool.bytes_in_use == 24 + 48
    pool.reset_peak()
    h2.release()
    h3.release()
    assert pool.peak_bytes == 72 and pool.bytes_in_use == 0
    pool.reset_peak()
    assert pool.peak_bytes == 0
    assert pool.empty_cache() == 72 and pool.bytes_reserved == 0


def test_budget_error_explains_and_cache_is_trimmed():
    pool = HostPool(max_bytes=100)
    h = pool.offload(torch.zeros(20))  # 80 bytes
    with pytest.raises(HostMemoryError, match=r"budget exceeded.*Raise max_bytes") as info:
        pool.offload(torch.zeros(10))
    assert isinstance(info.value, RuntimeError)
    assert pool.bytes_in_use == 80  # the failed request left no trace
    h.release()
    # The cached 80-byte buffer is dropped to make room for a different size.
    h2 = pool.offload(torch.zeros(25, dtype=torch.float32))
    assert pool.bytes_reserved == 100
    h2.release()


def test_groups_stash_lookup_release_and_clear():
    pool = HostPool()
    gid = pool.stash({"a": pool.offload(torch.ones(4)), "b": pool.offload(torch.ones(2))})
    assert set(pool.lookup(gid)) == {"a", "b"} and pool.live_groups == 1
    pool.release_group(gid)
    assert pool.bytes_in_use == 0 and pool.live_groups == 0
    with pytest.raises(RuntimeError, match="unknown or already released"):
        pool.lookup(gid)
    pool.stash({"a": pool.offload(torch.ones(4))})
    pool.clear()
    assert pool.bytes_in_use == 0 and pool.bytes_reserved == 0


def test_release_when_collected():
    pool = HostPool()
    gid = pool.stash({"a": pool.offload(torch.ones(4))})
    owner = torch.zeros(())
    pool.release_when_collected(owner, gid)
    assert pool.bytes_in_use == 16
    del owner
    assert pool.bytes_in_use == 0


def test_default_pool_and_bad_arguments():
    assert get_default_pool() is get_default_pool()
    mine = HostPool(max_bytes=10)
    prev = set_default_pool(mine)
    try:
        assert get_default_pool() is mine
    finally:
        set_default_pool(prev)
    with pytest.raises(ValueError, match="max_bytes"):
        HostPool(max_bytes=-1)
    with pytest.raises(TypeError):
        set_default_pool(object())
    with pytest.raises(TypeError):
        HostPool().offload([1, 2])
    assert HostPool().pin_memory == torch.cuda.is_available()


def test_data_ptrs_names_every_buffer_in_use_or_cached():
    pool = HostPool()
    a = pool.offload(torch.arange(16, dtype=torch.float32))
    b = pool.offload(torch.arange(8, dtype=torch.float64))
    ptrs = pool.data_ptrs()
    assert a.host.untyped_storage().data_ptr() in ptrs and b.host.untyped_storage().data_ptr() in ptrs
    a.release()
    assert len(pool.data_ptrs()) == 2  # released buffers stay cached, still the pool's
    pool.empty_cache()
    assert pool.data_ptrs() == {b.host.untyped_storage().data_ptr()}


def test_lowered_budget_applies_to_cached_buffers_too():
    pool = HostPool()
    h = pool.offload(torch.zeros(256))
    h.release()  # now cached, 1 KiB reserved
    pool.max_bytes = 512
    with pytest.raises(HostMemoryError, match="budget"):
        pool.offload(torch.zeros(256))


def test_per_request_budgets_are_separate_accounts():
    # Issue 14 item 4: a budget travels with each request (the op's argument), so two users
    # of one pool with different budgets, or one without, never see each other's bound.
    pool = HostPool()
    a = pool.offload(torch.zeros(20), max_bytes=100)  # 80 bytes of the 100-byte account
    with pytest.raises(HostMemoryError, match="budget.*host_pool_bytes"):
        pool.offload(torch.zeros(10), max_bytes=100)
    assert pool.bytes_in_use_for(100) == 80 and pool.bytes_in_use == 80
    # Other budgets and unbudgeted requests are not limited by that account.
    b = pool.offload(torch.zeros(200))
    c = pool.offload(torch.zeros(10), max_bytes=1000)
    assert pool.bytes_in_use_for(1000) == 40 and pool.bytes_in_use == 80 + 800 + 40
    assert pool.max_bytes is None
    a.release()
    assert pool.bytes_in_use_for(100) == 0
    # Released: the account has room again (a cached buffer of the same size is reused).
    a2 = pool.offload(torch.ones(20), max_bytes=100)
    assert pool.reuse_count == 1 and pool.bytes_in_use_for(100) == 80
    for h in (a2, b, c):
        h.release()
    assert pool.bytes_in_use == 0 and pool.bytes_in_use_for(100) == pool.bytes_in_use_for(1000) == 0


def test_budgeted_request_trims_the_cache_to_its_budget():
    pool = HostPool()
    for h in [pool.offload(torch.zeros(64)) for _ in range(4)]:
        h.release()
    assert pool.bytes_reserved == 4 * 256
    # A fresh 200-byte buffer under a 600-byte budget: cached buffers are dropped until
    # the account's live bytes + the cache + the request fit in 600.
    h = pool.offload(torch.zeros(50), max_bytes=600)
    assert pool.bytes_reserved - pool.bytes_in_use + pool.bytes_in_use_for(600) <= 600
    h.release()
    with pytest.raises(ValueError, match="max_bytes"):
        pool.offload(torch.zeros(2), max_bytes=-1)
