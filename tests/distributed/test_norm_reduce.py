"""RMSNorm(reduce=tp) sums a row-parallel layer's partial output before the residual add and
the norm: through the backend's fused op when it has one, else all_reduce then the usual op."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.ops import ReferenceOps
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.linear import RowParallelLinear
from tessellm.layers.norm import RMSNorm


class TwinRanks(TensorParallel):
    """A group of two ranks whose peer holds the same partial sum: all_reduce doubles x.
    (Real groups run in tests/distributed/test_parallel_parity.py.)"""

    def __init__(self):
        super().__init__(rank=0, size=2)
        self.calls = 0

    def all_reduce(self, x):
        self.calls += 1
        return x * 2


class FusedReduceOps(ReferenceOps):
    def __init__(self):
        self.fused_calls = 0

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, tp):
        self.fused_calls += 1
        return self.fused_add_rms_norm(tp.all_reduce(x), residual, weight, eps)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)


@pytest.mark.parametrize("ops_cls", [ReferenceOps, FusedReduceOps])
def test_norm_sums_the_partial_before_add_and_norm(ops_cls):
    x, residual = _inputs()
    tp, ops = TwinRanks(), ops_cls()
    norm = RMSNorm(16, 1e-6, ops, reduce=tp)
    out, new_residual = norm(x, residual.clone())
    want, want_residual = ReferenceOps().fused_add_rms_norm(2 * x, residual.clone(),
                                                            norm.weight, 1e-6)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(new_residual, want_residual)
    assert tp.calls == 1
    assert getattr(ops, "fused_calls", 1) == 1  # the backend's fused op, when it has one


def test_norm_without_reduce_or_group_of_one_never_reduces():
    x, residual = _inputs()
    plain = RMSNorm(16, 1e-6, ReferenceOps(), reduce=TensorParallel())  # size 1: nothing to sum
    assert plain.reduce is None
    out, _ = plain(x, residual.clone())
    want, _ = ReferenceOps().fused_add_rms_norm(x, residual.clone(), plain.weight, 1e-6)
    torch.testing.assert_close(out, want)


def test_reducing_norm_needs_a_residual():
    with pytest.raises(ValueError, match="without one"):
        RMSNorm(16, 1e-6, ReferenceOps(), reduce=TwinRanks())(torch.randn(2, 16))


def test_row_parallel_leaves_the_sum_to_its_consumer():
    tp = TwinRanks()
    layer = RowParallelLinear(8, 4, tp=tp, reduce_results=False)
    layer.weight.data = torch.randn(4, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())  # the partial product, unsummed
    assert tp.calls == 0
    summed = RowParallelLinear(8, 4, tp=tp)
    summed.weight.data = layer.weight.data
    torch.testing.assert_close(summed(x), 2 * (x @ layer.weight.t()))
    with pytest.raises(ValueError, match="takes no bias"):
        RowParallelLinear(8, 4, bias=True, tp=tp, reduce_results=False)
