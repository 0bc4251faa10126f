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
- A state cannot be rebuilt from a block hash: a request that arrives with computed tokens (a
  prefix-cache hit) starts from a snapshot the step names (``SchedulerOutput.state_restores``):
  the state after the hit's last block, kept in the snapshot pool (``snapshots``, allocated by
  ``allocate_snapshots``; which boundaries are kept: ``core/state_prefix.py``); one without
  a snapshot is an error. A preempted request is recomputed from its first token (its slot was
  freed; a new one is zeroed, or it hits its own prefix), which rebuilds its state exactly.
- Per step: restores (in ``begin_step``) come before the forward, saves (``save``) after it::

      snapshot pool, per layer:  conv [S, conv_dim, d_conv - 1]   ssm [S, ...state]
      begin_step:  state[slot of r] <- pool[state_restores[r]]      (a hit's start)
      forward
      save:        pool[state_saves[r]] <- state[slot of r]          (chunk ends on a boundary)
                   pool[s] <- spare(slot of r, j) or state[slot of r]  (state_saves_if_accepted:
                                                   a verify step's token j ends a block)

Per step the runner calls ``drop`` (after the scheduler's deltas) and ``begin_step`` (with the
step's requests in row order); the layers read the ``MambaBatch`` from ``step.batch``.

Speculative decoding (``spec_tokens = k > 0``): a state cannot give a rejected draft back, so
each slot ``m`` has ``k`` spare slots, and a step that verifies ``L = 1 + d`` tokens (a sampled
token and ``d <= k`` drafts; its rows come last in the step, ``MambaBatch.verifies``) leaves the
state after each of its tokens in a slot of its own (the ``*_verify`` ops)::

    slots:  0 .. num_slots - 1 | scratch | spares of slot 0 (k) | spares of slot 1 (k) | ...
    verify of slot m, L = 4:     token  t0          t1          t2          t3
                                 state  spare(m,0)  spare(m,1)  spare(m,2)  m

The request's next step learns from the scheduler how many tokens stayed computed (``a``, the
sampled token and the accepted drafts: ``1 <= a <= L``) and, before its forward, copies
``spare(m, a - 1)`` to ``m`` when ``a < L`` (vLLM selects the same way, by the accepted count).
So the invariant above holds again before any op reads slot ``m``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tessellm.backends.spec import MambaBatch


# Fresh slots zeroed through one view each per state tensor up to this many (``_zero``)
ZERO_VIEWS_MAX_SLOTS = 4


@dataclass
class MambaStep:
    """What the Mamba layers of one model share: the current step's batch (set by the cache
    each step, read by every layer's forward)."""

    batch: Optional[MambaBatch] = None


class MambaStateCache:
    def __init__(self, layers: list, num_slots: int, device: torch.device, dtype: torch.dtype,
                 spec_tokens: int = 0):
        """``layers``: the model's Mamba mixers (each has ``state_shapes()`` and ``bind``).
        ``spec_tokens``: drafts a verify step may carry (0: no speculative decoding)."""
        self.layers = layers
        self.num_slots = num_slots
        self.device = device
        self.spec_tokens = spec_tokens
        self.step = MambaStep()
        self.slot_of: dict[str, int] = {}
        self.free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest first
        self.scratch = num_slots  # padded graph rows' slot: never handed out, never read back
        # request id -> (tokens computed before its verify step, tokens it verified, its slot):
        # the verify steps whose accepted length the request's next step learns
        self.verifying: dict[str, tuple[int, int, int]] = {}
        total = (num_slots + 1) + num_slots * spec_tokens
        for layer in layers:
            conv_shape, ssm_shape = layer.state_shapes()
            layer.bind(torch.zeros((total, *conv_shape), dtype=dtype, device=device),
                       torch.zeros((total, *ssm_shape), dtype=dtype, device=device), self.step)
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (conv, ssm) pools
        # slot -> every layer's conv and SSM state of that slot as views (``_views``), and the
        # same of the snapshot pools' slots: made on a slot's first copy or zeroing, so a
        # restore or a new request's first step does not make 2 views a layer and tensor each
        # time (each an op of host time on the prefill's time to first token)
        self._state_views: dict[int, list[torch.Tensor]] = {}
        self._pool_views: dict[int, list[torch.Tensor]] = {}

    def allocate_snapshots(self, num: int, one_allocation: Optional[bool] = None) -> None:
        """The prefix cache's snapshot pool: ``num`` states of every layer (core/state_prefix.py).
        Allocated after the memory profile, as the KV cache is, so on CUDA (``one_allocation``
        None) one allocation per dtype (``runner_kv_cache.kv_cache_tensors``): a per-layer pool
        smaller than a block the profile's step left cached would take it, and the first step
        of that size would allocate the block again (core/memory_profile.py); on the host
        lazily backed memory per pool."""
        from tessellm.core.runner_kv_cache import kv_cache_tensors

        states = [t for layer in self.layers for t in (layer.conv_state, layer.ssm_state)]
        pools: list = [None] * len(states)
        for dtype in dict.fromkeys(t.dtype for t in states):
            idx = [i for i, t in enumerate(states) if t.dtype == dtype]
            made = kv_cache_tensors([(num, *states[i].shape[1:]) for i in idx], dtype, self.device,
                                    one_allocation)
            for i, pool in zip(idx, made):
                pools[i] = pool
        self.snapshots = [(pools[2 * j], pools[2 * j + 1]) for j in range(len(self.layers))]
        for layer, pools in zip(self.layers, self.snapshots):  # saves inside a step write them
            layer.snapshot_pools = pools
        self._pool_views = {}

    def save(self, saves: dict[str, int], if_accepted: Optional[dict[str, list]] = None,
             rows: Optional[dict[str, tuple[int, int]]] = None) -> None:
        """Copy the states of ``saves``' requests (after the step) into their snapshot slots,
        and for ``if_accepted`` (``SchedulerOutput.state_saves_if_accepted``: request id ->
        ``[[n, pool slot], ...]``) the state after each request's first ``n`` tokens where
        this step computed token ``n - 1``: a verify step's per-token state (its spare slot,
        or the request's slot for its last token), or a one-token step's state. ``rows``:
        request id -> (tokens computed before this step, tokens it computes)."""
        src, dst = [self.slot_of[rid] for rid in saves], list(saves.values())
        for rid, pairs in (if_accepted or {}).items():
            start, count = rows[rid]
            slot = self.slot_of[rid]
            verifies = self.verifying.get(rid, (None,))[0] == start  # set by this begin_step
            for n, pool_slot in pairs:
                j = n - start - 1  # this step's token whose state it is
                if j == count - 1:
                    src.append(slot)
                elif 0 <= j < count - 1 and verifies:
                    src.append(self.spare(slot, j))
                else:
                    continue  # not computed by this step: the scheduler gives the slot up
                dst.append(pool_slot)
        if src:
            self._copy(src, dst, to_pool=True)

    def _copy(self, slots: list[int], pool_slots: list[int], to_pool: bool) -> None:
        """Whole slots between the states and the snapshot pool (``slots[i]`` <-> ``pool_slots[i]``)
        as one multi-tensor copy of every layer's conv and SSM slot (one launch on a device
        that fuses ``_foreach_copy_``, e.g. CUDA's): a restore or save sits on the prefill's
        time to first token, where an index_select and an index_copy_ per layer and tensor
        (and two index uploads) cost ~4 launches a layer."""
        dst, src = [], []
        for s, p in zip(slots, pool_slots):
            states, pools = self._views(s, False), self._views(p, True)
            dst += pools if to_pool else states
            src += states if to_pool else pools
        if dst:
            torch._foreach_copy_(dst, src)

    def _views(self, slot: int, pool: bool) -> list[torch.Tensor]:
        """Slot ``slot`` of every layer's conv and SSM state (``pool``: of the snapshot pools),
        as views made once (the tensors stay; sleep mode resizes their storages in place)."""
        kept = self._pool_views if pool else self._state_views
        views = kept.get(slot)
        if views is None:
            tensors = ([t for pools in self.snapshots for t in pools] if pool else
                       [t for layer in self.layers for t in (layer.conv_state, layer.ssm_state)])
            views = kept[slot] = [t[slot] for t in tensors]
        return views

    def _zero(self, slots: list[int]) -> None:
        """Zero ``slots`` of every layer's conv and SSM state. A few slots (a step's new
        requests, usually one): one multi-tensor zeroing of their views (one launch on CUDA;
        an index upload and an ``index_fill_`` per layer and tensor are 2 launches a layer on
        a new prompt's first step). Many (the memory-profile step): ``index_fill_`` per tensor,
        not a view per slot, layer and tensor."""
        if len(slots) <= ZERO_VIEWS_MAX_SLOTS:
            torch._foreach_zero_([v for s in slots for v in self._views(s, False)])
            return
        states = [t for layer in self.layers for t in (layer.conv_state, layer.ssm_state)]
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        for t in states:
            t.index_fill_(0, idx, 0)

    def spare(self, slot: int, j: int) -> int:
        """Slot ``slot``'s spare for the state after token ``j`` of a verify step."""
        return self.num_slots + 1 + slot * self.spec_tokens + j

    def is_verify(self, state, count: int) -> bool:
        """Whether a request's step verifies drafts (its rows then go last: ``verifies``)."""
        return (self.spec_tokens > 0 and count > 1 and state.num_computed_tokens > 0
                and len(state.spec_token_ids) == count - 1)

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
            self.verifying.pop(rid, None)
            if slot is not None:
                self.free.append(slot)

    def begin_step(self, states, counts: list[int], profile: bool = False,
                   restores: Optional[dict[str, int]] = None,
                   within: Optional[dict[str, list]] = None) -> MambaBatch:
        """The step's ``MambaBatch`` (``states``: the runner's requests in row order, before
        their ``num_computed_tokens`` advance; ``counts``: tokens each computes). New requests
        get a slot; slots of requests at their first token are zeroed, those of ``restores``
        (request id -> snapshot slot: a prefix hit) copied from the snapshot. ``profile``: the
        memory-profile forward (slots assigned round-robin and not kept). ``within``
        (``SchedulerOutput.state_saves_within``): request id -> ``[[n, snapshot slot], ...]``,
        the states after ``n`` tokens inside its prefill chunk (``MambaBatch.state_saves``)."""
        restores = restores or {}
        slots, fresh, keep = [], [], ([], [])
        for i, st in enumerate(states):
            if profile:
                slot = i % self.num_slots
            else:
                slot = self.slot_of.get(st.request_id)
                if slot is None:
                    if st.num_computed_tokens and st.request_id not in restores:
                        raise RuntimeError(
                            f"Request {st.request_id!r} has {st.num_computed_tokens} computed "
                            "tokens but no recurrent state to start from (a prefix-cache hit "
                            "must name its snapshot in SchedulerOutput.state_restores).")
                    if not self.free:
                        raise RuntimeError(f"All {self.num_slots} Mamba state slots are in use; "
                                           "the scheduler ran more requests than max_num_seqs.")
                    slot = self.slot_of[st.request_id] = self.free.pop()
            if st.num_computed_tokens == 0:
                fresh.append(slot)
            if not profile:
                self._accepted(st, slot, keep)
            slots.append(slot)
        if fresh:
            self._zero(fresh)
        if restores:
            self._copy([self.slot_of[r] for r in restores], list(restores.values()), to_pool=False)
        if keep[0]:  # the state after each accepted prefix into its request's slot
            src, dst = (torch.tensor(v, dtype=torch.long).to(self.device, non_blocking=True)
                        for v in keep)
            for layer in self.layers:
                for t in (layer.conv_state, layer.ssm_state):
                    t.index_copy_(0, dst, t.index_select(0, src))
        verify = 0
        if self.spec_tokens and not profile:
            while (verify < len(states)
                   and self.is_verify(states[-1 - verify], counts[-1 - verify])):
                verify += 1
        token_slots = []
        for st, n, slot in zip(states[len(states) - verify:], counts[len(counts) - verify:],
                               slots[len(slots) - verify:]):
            token_slots += [self.spare(slot, j) for j in range(n - 1)] + [slot]
            self.verifying[st.request_id] = (st.num_computed_tokens, n, slot)
        saves = []
        for i, st in enumerate(states[:len(states) - verify] if within else ()):
            for n, pool_slot in within.get(st.request_id, ()):
                if 0 < n - st.num_computed_tokens < counts[i]:
                    saves.append((i, n - st.num_computed_tokens, pool_slot))
        self.step.batch = make_batch(counts, slots, self.device, verify, token_slots, saves)
        return self.step.batch

    def _accepted(self, st, slot: int, keep: tuple[list, list]) -> None:
        """A request whose last step verified drafts: the spare holding the state after its
        accepted prefix, to copy into its slot (``keep``: sources, destinations)."""
        done = self.verifying.pop(st.request_id, None)
        if done is None:
            return
        before, verified, _ = done
        kept = st.num_computed_tokens - before  # the sampled token and the accepted drafts
        if not 1 <= kept <= verified:
            raise RuntimeError(f"Request {st.request_id!r} verified {verified} tokens from "
                               f"{before}, but the scheduler says {st.num_computed_tokens} are "
                               "computed; its recurrent state has no such point.")
        if kept < verified:
            keep[0].append(self.spare(slot, kept - 1))
            keep[1].append(slot)

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

    def verify_batch(self, slots: torch.Tensor, token_slots: torch.Tensor,
                     query_start_loc: torch.Tensor, length: int) -> MambaBatch:
        """Set the step's batch inside a captured verify step (``spec_decode/verify_graphs.py``):
        every row of ``slots [S]`` a sequence of ``length`` tokens verifying drafts, the state
        after each token to ``token_slots [S * length]`` (padded sequences: the scratch slot for
        all), ``query_start_loc`` its ``S + 1`` offsets on the device. Like ``decode_batch``,
        the slots are not on the host (the verify ops read the device tensors)."""
        n = slots.shape[0]
        verifies = MambaBatch(query_start_loc, slots, 0, list(range(0, n * length + 1, length)),
                              [], token_slots=token_slots)
        self.step.batch = MambaBatch(query_start_loc[:1], slots[:0], 0, [0], [],
                                     verifies=verifies)
        return self.step.batch

    def all_verify(self, num_seqs: int) -> bool:
        """Whether every one of the current step's ``num_seqs`` sequences verifies drafts (the
        steps a captured verify graph may replay)."""
        ver = self.step.batch.verifies if self.step.batch is not None else None
        return ver is not None and len(ver.state_indices_host) == num_seqs

    def graph_verify_slots(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The current (all-verify) step's state slots ``[size]`` and token slots ``[size, q]``,
        padded to ``size`` sequences with the scratch slot: a verify graph's inputs."""
        ver = self.step.batch.verifies
        n, q = len(ver.state_indices_host), ver.query_start_loc_host[1]
        slots = np.full(size, self.scratch, dtype=np.int32)
        slots[:n] = ver.state_indices_host
        tokens = np.full((size, q), self.scratch, dtype=np.int32)
        tokens[:n] = np.asarray(ver.token_slots_host, dtype=np.int32).reshape(n, q)
        return slots, tokens


def make_batch(counts: list[int], slots: list[int], device: torch.device, verify: int = 0,
               token_slots: Optional[list[int]] = None, saves: Optional[list] = None) -> MambaBatch:
    """The ``MambaBatch`` of sequences of ``counts`` tokens in ``slots`` (decodes first: the
    leading sequences of one token). ``verify``: the last so many sequences verify drafts
    (``MambaBatch.verifies``; ``token_slots``: the slot for the state after each of their
    tokens). ``saves``: ``(sequence, offset, snapshot slot)``, ``MambaBatch.state_saves`` (of
    sequences before the verifying ones)."""
    if verify:
        cut = len(counts) - verify
        vq = [0]
        for n in counts[cut:]:
            vq.append(vq[-1] + n)
        verifies = MambaBatch(_ints(vq, device), _ints(slots[cut:], device), 0, vq,
                              list(slots[cut:]), token_slots=_ints(token_slots, device),
                              token_slots_host=list(token_slots))
        # (``positions``, what the composed verify ops index by, is built by the first layer
        # that needs it: ops with their own verify kernels never do)
        batch = make_batch(counts[:cut], slots[:cut], device, saves=saves)
        batch.verifies = verifies
        return batch
    qsl = [0]
    for n in counts:
        qsl.append(qsl[-1] + n)
    decodes = 0
    while decodes < len(counts) and counts[decodes] == 1:
        decodes += 1
    if decodes == len(counts):
        qsl_d, slots_d = _ints_views(device, qsl, slots)
        return MambaBatch(qsl_d, slots_d, decodes, qsl, list(slots),
                          state_saves=list(saves or ()))
    # the prefill sequences' own offsets and slots go up in the same copy (one a step), each
    # list 16-byte aligned as a tensor of its own would be (the Triton kernels compile one
    # variant for aligned pointers: a slice of slots at the decodes' count would be another)
    pq, pslots = [q - qsl[decodes] for q in qsl[decodes:]], list(slots[decodes:])
    qsl_d, slots_d, pq_d, pslots_d = _ints_views(device, qsl, slots, pq, pslots)
    prefills = MambaBatch(pq_d, pslots_d, 0, pq, pslots,
                          state_saves=[(i - decodes, o, p) for i, o, p in saves or ()])
    return MambaBatch(qsl_d, slots_d, decodes, qsl, list(slots), prefills,
                      state_saves=list(saves or ()))


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def _ints_views(device: torch.device, *lists: list[int]) -> list[torch.Tensor]:
    """The int lists as int32 tensors on ``device``, each a view of one upload (one host-to-device
    copy a step, not one a list); each view starts 16-byte aligned (a kernel may assume it)."""
    flat, bounds = [], []
    for values in lists:
        flat += [0] * (-len(flat) % 4)
        bounds.append((len(flat), len(flat) + len(values)))
        flat += values
    both = _ints(flat, device)
    return [both[a:b] for a, b in bounds]
