"""The recurrent-state cache's snapshot copies (core/mamba_state.py) on a tiny Mamba2 engine:
a save and a restore move exactly one slot of every layer's conv and SSM state, touch nothing
else, and are one multi-tensor copy each (they sit on a cached prompt's time to first token;
an index_select and an index_copy_ per layer and tensor cost ~4 launches a layer)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import torch

from tessellm import LLM
from tests.aten_ops import AtenOps
from tests.models.test_mamba2 import mamba2_config
from tests.models.variant_parity import save_tiny

def test_save_and_restore_copy_one_slot_per_state_tensor_in_one_op(tmp_path):
    path = save_tiny(mamba2_config(), str(tmp_path / "mamba2"))
    with LLM(path, device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4,
             recurrent_state_snapshots=6) as llm:
        cache = llm.engine.core.runner.mamba
        states = [t for layer in cache.layers for t in (layer.conv_state, layer.ssm_state)]
        pools = [p for pair in cache.snapshots for p in pair]
        assert len(cache.layers) >= 2 and pools and all(p.shape[0] == 6 for p in pools)
        torch.manual_seed(0)
        for t in states + pools:
            t.copy_(torch.randn_like(t))

        cache.slot_of["a"] = 2  # a request's state in slot 2, saved into snapshot 5
        old_states, old_pools = [t.clone() for t in states], [p.clone() for p in pools]
        with AtenOps() as save:
            cache.save({"a": 5})
        for t, p, t0, p0 in zip(states, pools, old_states, old_pools):
            assert torch.equal(p[5], t0[2])
            assert torch.equal(p[:5], p0[:5]) and torch.equal(t, t0)
        assert save.ops == Counter({"_foreach_copy_": 1})

        # a new request whose prefix hit ends at snapshot 1: its fresh slot gets snapshot 1
        hit = SimpleNamespace(request_id="b", num_computed_tokens=16, spec_token_ids=[])
        old_states, old_pools = [t.clone() for t in states], [p.clone() for p in pools]
        with AtenOps() as restore:
            cache.begin_step([hit], [4], restores={"b": 1})
        slot = cache.slot_of["b"]
        assert slot != 2
        for t, p, t0, p0 in zip(states, pools, old_states, old_pools):
            assert torch.equal(t[slot], p0[1]) and torch.equal(p, p0)
            rest = [i for i in range(t.shape[0]) if i != slot]
            assert torch.equal(t[rest], t0[rest])
        # the state copy is one op; the rest is the step's batch (its index tensors)
        assert restore.ops["_foreach_copy_"] == 1
        assert not {"index_copy", "index_copy_", "index_select"} & set(restore.ops)
        del cache.slot_of["a"]  # (never taken from the free list)
        cache.drop(["b"])
