"""Runtime support: the host-offload pool, copy streams and prefetch, and our ops' autocast rule (``runtime.autocast``)."""

from .host_pool import HostHandle, HostMemoryError, HostPool, PendingCopy, get_default_pool, set_default_pool

__all__ = ["HostHandle", "HostMemoryError", "HostPool", "PendingCopy", "get_default_pool", "set_default_pool"]
