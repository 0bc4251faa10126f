"""A new request's recurrent-state slot (core/mamba_state.py ``begin_step``) is zeroed in every
layer's conv and SSM state, nothing else touched, by one multi-tensor op (a new prompt's first
step: not an index upload and an ``index_fill_`` per layer and tensor); many new requests at
once (the memory-profile step) are zeroed the same."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tessellm.core.mamba_state import ZERO_VIEWS_MAX_SLOTS, MambaStateCache
from tests.aten_ops import AtenOps

class _Layer:
    def state_shapes(self):
        return (6, 3), (2, 4, 5)

    def bind(self, conv_state, ssm_state, step):
        self.conv_state, self.ssm_state = conv_state, ssm_state


def _cache(layers: int, slots: int) -> tuple[MambaStateCache, list[torch.Tensor]]:
    cache = MambaStateCache([_Layer() for _ in range(layers)], slots, torch.device("cpu"),
                            torch.float32)
    states = [t for layer in cache.layers for t in (layer.conv_state, layer.ssm_state)]
    torch.manual_seed(0)
    for t in states:
        t.copy_(torch.randn_like(t) + 2.0)  # no zero anywhere
    return cache, states


def _new(rid: str):
    return SimpleNamespace(request_id=rid, num_computed_tokens=0, spec_token_ids=[])


def test_new_request_slot_zeroed_in_every_layer_by_one_op():
    cache, states = _cache(layers=5, slots=4)
    old = [t.clone() for t in states]
    with AtenOps() as ops:
        cache.begin_step([_new("a")], [7])
    slot = cache.slot_of["a"]
    for t, t0 in zip(states, old):
        rest = [i for i in range(t.shape[0]) if i != slot]
        assert torch.count_nonzero(t[slot]) == 0 and torch.equal(t[rest], t0[rest])
    assert ops.ops["_foreach_zero_"] == 1 and "index_fill_" not in ops.ops


def test_many_new_requests_zeroed_alike():
    n = ZERO_VIEWS_MAX_SLOTS + 2
    cache, states = _cache(layers=3, slots=n + 1)
    old = [t.clone() for t in states]
    cache.begin_step([_new(str(i)) for i in range(n)], [1] * n)
    taken = sorted(cache.slot_of.values())
    for t, t0 in zip(states, old):
        rest = [i for i in range(t.shape[0]) if i not in taken]
        assert torch.count_nonzero(t[taken]) == 0 and torch.equal(t[rest], t0[rest])
