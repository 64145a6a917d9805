"""Sequence-chunked exact attention (FPDT-style): reference, chunked torch, Triton, op.

Layout: ``q`` ``[B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` (SDPA's). See README.md.
"""

from .chunked import chunked_attention_backward, chunked_attention_forward
from .op import chunked_attention
from .reference import attention_reference

__all__ = ["attention_reference", "chunked_attention", "chunked_attention_forward", "chunked_attention_backward"]
