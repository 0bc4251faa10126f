"""Checks shared by the models whose layers keep a per-request recurrent state (Mamba2 mixers,
gated DeltaNet: ``core/mamba_state.py``): preemption rebuilds the states, async scheduling
follows them, and a plugin's fused ops without the model's flag refuse it at load."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import hf_reference, prompts


def assert_preemption_rebuilds_states(path: str, stateful_layers: int, **engine) -> None:
    """A KV cache too small for every request at once: the scheduler preempts, the preempted
    request's slot is freed and its states rebuilt from its first token; HF's tokens. The
    cache serves ``stateful_layers`` layers, holds a slot per request the runner still holds
    (it hears of the last finished ones with the next step) and loses none. Prefix caching is
    on (state snapshots at block boundaries, core/state_prefix.py)."""
    prompt_list = prompts((20, 24, 28, 30), seed=5)
    want, _ = hf_reference(path, prompt_list, 16)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(path, dtype="float32", num_kv_blocks=24, block_size=4, **engine) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False)
        core = llm.engine.core
        assert core.scheduler.num_preemptions_total > 0, "the tiny cache should force preemption"
        # prefix caching on: a preempted request may start again from its own snapshots
        assert core.kv.enable_prefix_caching and core.kv.states is not None
        if engine.get("async_scheduling"):
            assert core.async_scheduling
        else:
            runner = core.executor.worker.runner
            cache = runner.mamba
            assert len(cache.layers) == stateful_layers
            assert set(cache.slot_of) == set(runner.requests)
            assert len(cache.free) + len(cache.slot_of) == cache.num_slots
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def assert_refused_on_ops_without(path: str, flag: str, match: str) -> None:
    """A plugin's fused ops (an override of cpu's) that set ``flag`` False, as ops written
    before the flag's API: building the model raises a ValueError matching ``match``."""
    import torch

    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tests.backends.backend_plugins import make_plugin

    name = f"oldops_{flag}"
    old = make_plugin(name, f"""
        TESSELLM_OVERRIDES = ("cpu",)
        from tessellm.backends.reference.ops import ReferenceOps
        class OldOps(ReferenceOps):
            {flag} = False
        @hookimpl(tryfirst=True)
        def tessellm_fused_ops(backend, spec):
            return OldOps() if backend.name == "cpu" else None
    """)
    registry = BackendRegistry(plugins=[(name, old)])
    with pytest.raises(ValueError, match=match):
        build_model(resolve_model(path), "safetensors", registry, registry.backends["cpu"],
                    torch.float32, torch.device("cpu"), block_size=16)
