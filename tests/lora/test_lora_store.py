"""The host-side adapter cache (tessellm/lora/store.py) around its loader thread's shutdown:
the engine shuts the store down with it; a later use makes the thread again, as the first use
did, instead of failing on an executor that has ended."""

from __future__ import annotations

import time

from tessellm.lora.request import LoRARequest


def _store(model: str):
    from transformers import AutoConfig

    from tessellm.lora.shapes import BaseShapes
    from tessellm.lora.store import AdapterStore

    return AdapterStore(BaseShapes.from_config(AutoConfig.from_pretrained(model)), 32, 4)


def _wait_ready(store, lora_id: int) -> None:
    deadline = time.monotonic() + 30
    while not store.ready(lora_id):
        assert store.error(lora_id) is None, store.error(lora_id)
        assert time.monotonic() < deadline, "the adapter never loaded"
        store.wait_any(0.1)


def test_a_store_used_after_shutdown_loads_again(lora_setup):
    model, paths = lora_setup
    store = _store(model)
    first, second = LoRARequest("a", 1, paths["qv8"]), LoRARequest("b", 2, paths["kogate16"])
    store.ensure(first)
    _wait_ready(store, 1)
    store.shutdown()
    store.shutdown()  # again: nothing
    store.ensure(second)  # a new loader thread, made at this first use after the shutdown
    _wait_ready(store, 2)
    assert store.ready(1) and store.get(second).request is second
    store.shutdown()


def test_loads_dropped_by_shutdown_are_read_again_on_next_use(lora_setup):
    """Queued loads the shutdown dropped are forgotten, not left "loading" for good."""
    model, paths = lora_setup
    store = _store(model)
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(sorted(paths.items()))]
    for lora in loras:
        store.ensure(lora)
    store.shutdown()  # the first may be under way; the others are dropped
    for lora in loras:
        store.ensure(lora)
    for lora in loras:
        _wait_ready(store, lora.lora_int_id)
    store.shutdown()
