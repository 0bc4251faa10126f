"""The model runner's side of LoRA: the wrapped layers, slot contents, and per-step slots.

Per step the scheduler says which adapter to put in which slot (``SchedulerOutput.lora_loads``,
before this step's forward) and each request's slot (``lora_slots``); this turns them into the
int32 slot of every token row::

    requests (runner order):  A (3 tokens, slot 1)   B (1 token, none)   C (2 tokens, slot 0)
    token_slots:              [1 1 1                  -1                  0 0]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from tessellm.lora.config import LoRAConfig
from tessellm.lora.layers import LoRABatch, wrap_model
from tessellm.lora.moe_layers import wrap_experts
from tessellm.lora.request import LoRARequest
from tessellm.lora.shapes import LAYER_SLICES, BaseShapes
from tessellm.lora.store import AdapterStore


class LoRAWorkerState:
    def __init__(self, model, ops, config: LoRAConfig, hf_config, device: torch.device):
        self.config = config
        self.device = device
        self.batch = LoRABatch(ops, config.max_loras)
        shapes = BaseShapes.from_config(hf_config)
        optional = shapes.layers if shapes.family.optional else ()  # where the layer has it
        self.layers = wrap_model(model, self.batch, config.max_loras, config.max_lora_rank,
                                 shapes.layers, shapes.arch, optional)
        self.arch = shapes.arch
        self.own_layers = range(model.start_layer, model.end_layer)  # pipeline parallelism
        # each MoE layer's experts (families whose experts take LoRA: ``families.py``)
        self.experts = (wrap_experts(model, self.batch, config.max_loras, config.max_lora_rank)
                        if shapes.num_experts else {})
        # Adapters are read from this cache; in one process it is the engine core's (already
        # loaded off the step loop: ``share_store``), a worker process keeps its own.
        self.store = AdapterStore(shapes, config.max_lora_rank, config.max_cpu_loras)
        self.owns_store = True  # False: the core's store, which evicts unloaded adapters itself
        self.slot_ids: list[Optional[int]] = [None] * config.max_loras

    def share_store(self, store: AdapterStore) -> None:
        """Read adapters from the engine core's cache (one process: no second copy)."""
        self.store, self.owns_store = store, False

    def unload(self, lora_id: int) -> None:
        """An adapter unloaded at the core: drop this process's host copy (the core's store
        already did, when shared) and forget its slot (the next load overwrites it)."""
        if self.owns_store:
            self.store.evict(lora_id)
        self.slot_ids = [None if s == lora_id else s for s in self.slot_ids]

    def load_slot(self, slot: int, lora: LoRARequest) -> None:
        adapter = self.store.get(lora)
        for (index, name), layer in self.layers.items():
            layer.set_slot(slot, [adapter.modules.get((index, m)) for m in LAYER_SLICES[name]])
        for (index, name), module in adapter.modules.items():
            if name == "experts" and index not in self.experts and index in self.own_layers:
                raise ValueError(f"LoRA adapter {lora.lora_name!r} adapts the experts of layer "
                                 f"{index}, but {self.arch}'s experts there are quantized or not "
                                 "a gated MoE, which take no LoRA; serve the model unquantized or "
                                 "an adapter without expert modules.")
        for index, layer in self.experts.items():
            layer.set_slot(slot, adapter.modules.get((index, "experts")))
        self.slot_ids[slot] = lora.lora_int_id

    @property
    def graph_capturable(self) -> bool:
        """The backend's LoRA ops may run inside a captured graph (``prepare`` reads nothing
        on the host): then graphs take the token slots as an input and cover LoRA steps."""
        return bool(getattr(self.batch.ops, "supports_graph_capture", False))

    def begin_step(self, loads: list, lora_slots: dict, order: list[str], counts: list[int],
                   prefetch: list = (), unloads: list = ()) -> Optional[np.ndarray]:
        """Drop unloaded adapters, start reading announced ones (``prefetch``: a worker
        process's own cache; a no-op on the core's), fill new slots; the step's int32 slot per
        token row, or None when no row uses an adapter (the runner hands it to ``batch.set``,
        or to a graph). Unloads come first: an adapter unloaded and named again since the
        last step is read again."""
        for lora_id in unloads:
            self.unload(int(lora_id))
        for lora in prefetch:
            self.store.ensure(LoRARequest.from_dict(lora))
        for slot, lora in loads:
            self.load_slot(int(slot), LoRARequest.from_dict(lora))
        if not lora_slots:
            return None
        per_request = np.fromiter((lora_slots.get(r, -1) for r in order), dtype=np.int32,
                                  count=len(order))
        return np.repeat(per_request, counts)
