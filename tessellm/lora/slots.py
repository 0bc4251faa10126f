"""The scheduler's adapter slots: which adapter each device slot holds, and who uses it.

Plain Python, no torch. Invariants:

* A request with an adapter holds a slot from admission until it finishes or is preempted;
  every request in a step is running, so a step never has more distinct adapters than slots.
* A slot changes adapter only while no request holds it (LRU among the free ones); the new
  adapter is loaded by the runner before the step that first uses it (``take_loads``).
* A request is admitted only once its adapter is in the host cache (``AdapterStore.ready``),
  read by a background thread: otherwise it waits, others go ahead.
* No starvation: once a request in an admission pass waits for a slot (its adapter is ready,
  every slot is held), later requests of that pass get no slot either, not even one holding
  their adapter: the slots drain as their requests finish, and the oldest waiting adapter
  gets the first one free. Requests without an adapter still go ahead. (vLLM lets requests
  for adapters in slots overtake it, without bound.)
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the scheduler stays free of torch: the store is handed in
    from tessellm.lora.request import LoRARequest
    from tessellm.lora.store import AdapterStore

WAIT = -1  # acquire(): the request waits (adapter loading, or every slot busy)
FAILED = -2  # acquire(): the adapter cannot be loaded (``store.error`` says why)


class LoRASlots:
    def __init__(self, num_slots: int, store: "AdapterStore"):
        self.store = store
        self.slot_ids: list[Optional[int]] = [None] * num_slots  # adapter id per slot
        self.users = [0] * num_slots  # running requests holding each slot
        self.last_used = [0] * num_slots
        self._tick = itertools.count(1)
        self._loads: list = []  # [slot, lora dict] since the last step
        self._announced: set[int] = set()  # adapter ids sent to the workers for prefetching
        self._prefetch: list = []  # lora dicts to announce with the next step
        self._dropping: set[int] = set()  # removed while requests still used them (``drop``)
        self._unloads: list[int] = []  # dropped ids to send to the workers with the next step
        self.draining = False  # this admission pass: an older request waits for a free slot

    def acquire(self, lora: "LoRARequest") -> int:
        """A slot holding ``lora`` for one more request, or WAIT / FAILED."""
        key = lora.lora_int_id
        if key in self.slot_ids:
            if self.draining:
                return WAIT  # it would keep the slot busy that an older request waits for
            slot = self.slot_ids.index(key)
        else:
            if self.store.error(key) is not None:
                return FAILED
            self.store.ensure(lora)
            if not self.store.ready(key):
                return WAIT
            free = [s for s, n in enumerate(self.users) if n == 0]
            if not free:
                self.draining = True
                return WAIT
            slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self.last_used[s]))
            self.slot_ids[slot] = key
            self._loads = [x for x in self._loads if x[0] != slot] + [[slot, lora.to_dict()]]
        self.users[slot] += 1
        self.last_used[slot] = next(self._tick)
        return slot

    def begin_admission(self) -> None:
        """A new pass over the waiting queue (``Scheduler._admit_waiting``), oldest first."""
        self.draining = False

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.users[slot] -= 1
            if not self.users[slot] and self.slot_ids[slot] in self._dropping:
                self.drop(self.slot_ids[slot])

    def announce(self, lora: "LoRARequest") -> None:
        """A request names ``lora``: worker processes start reading it with the next step."""
        if lora.lora_int_id not in self._announced:
            self._announced.add(lora.lora_int_id)
            self._prefetch.append(lora.to_dict())

    def take_prefetch(self) -> list:
        prefetch, self._prefetch = self._prefetch, []
        return prefetch

    def take_loads(self) -> list:
        """Slots the runner must fill before the next step: ``[[slot, lora dict], ...]``."""
        loads, self._loads = self._loads, []
        return loads

    def take_unloads(self) -> list:
        """Adapter ids dropped since the last step: worker processes evict their own copies."""
        unloads, self._unloads = self._unloads, []
        return unloads

    def drop(self, lora_id: int) -> bool:
        """Forget an adapter (unloaded at the server: ``EngineCore.remove_lora``): its slot is
        free for any adapter and its host copy evicted, now, or, while requests still use it
        (they finish with it), when the last of them lets go (False then); worker processes
        evict theirs with the next step (``take_unloads``). A request naming it later reads
        it again."""
        self._announced.discard(lora_id)
        self._prefetch = [p for p in self._prefetch if p["id"] != lora_id]
        if lora_id in self.slot_ids:
            slot = self.slot_ids.index(lora_id)
            if self.users[slot]:
                self._dropping.add(lora_id)
                return False
            self.slot_ids[slot] = None
        self._dropping.discard(lora_id)
        self.store.evict(lora_id)
        self._unloads.append(lora_id)
        return True
