"""Launch arithmetic of the kernels' Python wrappers in plain ints: ``triton.cdiv`` and
``triton.next_power_of_2`` are ``ConstexprFunction`` objects under Triton 3.9, ~1 us of host
time a call (arguments unwrapped as constexprs) where these are ~0.03; a Mamba2 layer's eager
step made ~10 such calls (``benchmarks/hybrid_host_step.py``). Same values as Triton's."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` for ``n >= 1``; 0 for ``n <= 0`` (as
    ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
