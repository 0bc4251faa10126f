"""The recurrent-state cache of a model with Mamba layers: one slot per running request.

A Mamba layer's memory of a sequence is not a KV row per token but one fixed-size state per
request, overwritten by every token: the conv state ``[conv_dim, d_conv - 1]`` (the last
inputs of its causal convolution) and the SSM state ``[heads, head_dim, d_state]``. Each layer
holds both for every slot::

    layer.conv_state  [num_slots, conv_dim, d_conv - 1]
    layer.ssm_state   [num_slots, heads, head_dim, d_state]

    slots:   0      1      2      3   ...  num_slots - 1  num_slots   (num_slots = max_num_seqs)
    owner:   req7   -      req2   req9                       scratch     free slots: a list, reused

The last state (``scratch``) belongs to no request: the padded rows of a captured decode graph
(``core/runner_graphs.py``) read and write it, so replaying a graph larger than the step
touches no request's state.

Invariants:

- A running request owns exactly one slot from its first scheduled step until it is dropped
  (finished, aborted or preempted: ``SchedulerOutput.dropped_request_ids``); the scheduler
  never runs more than ``max_num_seqs`` requests, so a slot is always free for a new one.
- A slot holds the state after the request's ``num_computed_tokens`` tokens. It is zeroed in the
  step that computes the request's first token, and each step's ops leave the state after the
  step's tokens in it, so prefill chunks continue one another (chunked prefill).
- A state cannot be rebuilt from a block hash: a request that arrives with computed tokens the
  cache has no state for (a prefix-cache hit) is an error; the engine turns prefix caching off
  for these models (``models/state_space.py``). A preempted request is recomputed from its
  first token (its slot was freed; a new one is zeroed), which rebuilds its state exactly.

Per step the runner calls ``drop`` (after the scheduler's deltas) and ``begin_step`` (with the
step's requests in row order); the layers read the ``MambaBatch`` from ``step.batch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tessellm.backends.spec import MambaBatch


@dataclass
class MambaStep:
    """What the Mamba layers of one model share: the current step's batch (set by the cache
    each step, read by every layer's forward)."""

    batch: Optional[MambaBatch] = None


class MambaStateCache:
    def __init__(self, layers: list, num_slots: int, device: torch.device, dtype: torch.dtype):
        """``layers``: the model's Mamba mixers (each has ``state_shapes()`` and ``bind``)."""
        self.layers = layers
        self.num_slots = num_slots
        self.device = device
        self.step = MambaStep()
        self.slot_of: dict[str, int] = {}
        self.free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest first
        self.scratch = num_slots  # padded graph rows' slot: never handed out, never read back
        for layer in layers:
            conv_shape, ssm_shape = layer.state_shapes()
            layer.bind(torch.zeros((num_slots + 1, *conv_shape), dtype=dtype, device=device),
                       torch.zeros((num_slots + 1, *ssm_shape), dtype=dtype, device=device), self.step)

    @staticmethod
    def bytes_per_slot(layers: list, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        total = 0
        for layer in layers:
            for shape in layer.state_shapes():
                n = 1
                for d in shape:
                    n *= d
                total += n * elem
        return total

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.conv_state, layer.ssm_state))

    def drop(self, request_ids) -> None:
        """Free the slots of finished, aborted and preempted requests."""
        for rid in request_ids:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self.free.append(slot)

    def begin_step(self, states, counts: list[int], profile: bool = False) -> MambaBatch:
        """The step's ``MambaBatch`` (``states``: the runner's requests in row order, before
        their ``num_computed_tokens`` advance; ``counts``: tokens each computes). New requests
        get a slot; slots of requests at their first token are zeroed. ``profile``: the
        memory-profile forward (slots assigned round-robin and not kept)."""
        slots, fresh = [], []
        for i, st in enumerate(states):
            if profile:
                slot = i % self.num_slots
            else:
                slot = self.slot_of.get(st.request_id)
                if slot is None:
                    if st.num_computed_tokens:
                        raise RuntimeError(
                            f"Request {st.request_id!r} has {st.num_computed_tokens} computed "
                            "tokens but no recurrent state; a Mamba state cannot be rebuilt "
                            "from cached KV blocks (prefix caching must be off for this model).")
                    if not self.free:
                        raise RuntimeError(f"All {self.num_slots} Mamba state slots are in use; "
                                           "the scheduler ran more requests than max_num_seqs.")
                    slot = self.slot_of[st.request_id] = self.free.pop()
            if st.num_computed_tokens == 0:
                fresh.append(slot)
            slots.append(slot)
        if fresh:
            idx = torch.tensor(fresh, dtype=torch.long, device=self.device)
            for layer in self.layers:
                layer.conv_state.index_fill_(0, idx, 0)
                layer.ssm_state.index_fill_(0, idx, 0)
        self.step.batch = make_batch(counts, slots, self.device)
        return self.step.batch

    def graph_slots(self, size: int) -> np.ndarray:
        """The slots of the current (all-decode) step's rows, padded to ``size`` rows with the
        scratch slot: a captured decode graph's state-slot input."""
        slots = np.full(size, self.scratch, dtype=np.int32)
        host = self.step.batch.state_indices_host
        slots[:len(host)] = host
        return slots

    def decode_batch(self, slots: torch.Tensor, query_start_loc: torch.Tensor) -> MambaBatch:
        """Set the step's batch inside a captured decode step: one token per row, the rows'
        slots a device tensor (``graph_slots``). The host slot list is empty: nothing in a
        captured step may read slots on the host (the ops' decode paths use the device ones)."""
        n = slots.shape[0]
        self.step.batch = MambaBatch(query_start_loc, slots, n, list(range(n + 1)), [])
        return self.step.batch


def make_batch(counts: list[int], slots: list[int], device: torch.device) -> MambaBatch:
    """The ``MambaBatch`` of sequences of ``counts`` tokens in ``slots`` (decodes first: the
    leading sequences of one token)."""
    qsl = [0]
    for n in counts:
        qsl.append(qsl[-1] + n)
    decodes = 0
    while decodes < len(counts) and counts[decodes] == 1:
        decodes += 1
    prefills = None
    if decodes < len(counts):
        pq = [q - qsl[decodes] for q in qsl[decodes:]]
        prefills = MambaBatch(_ints(pq, device), _ints(slots[decodes:], device), 0, pq,
                              list(slots[decodes:]))
    return MambaBatch(_ints(qsl, device), _ints(slots, device), decodes, qsl, list(slots), prefills)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)
