"""The scheduler's side of a KV connector's background loads (vLLM's ``WAITING_FOR_REMOTE_KVS``).

A mixin of ``Scheduler`` (tessellm/core/scheduler.py), which owns the state it reads and
writes: ``requests``, ``waiting``, ``running``, ``kv`` (the BlockManager), ``connector``.
Plain Python, no torch.

A request whose connector hit is loaded in the background (``get_num_new_matched_tokens``
returned ``(n, True)``) gets blocks for its device and host-tier hit and the loaded tokens at
admission, counts them as computed, and stays in ``waiting``, in its place, with
``kv_loading`` set: admission passes over it and other requests run meanwhile. Every step
asks the workers about it (``meta["check"]``); when they report the load (``update`` ->
``finish_kv_loads``) its blocks enter the prefix cache and it is admitted like any waiting
request, its remaining prompt tokens computed. A failed load frees its blocks and the request
starts over from its tokens without the connector. Blocks of a load under way are never freed
(an aborted request gives them back when its load is reported).
"""

from __future__ import annotations

import time
from typing import Optional

from tessellm.core.request import Request
from tessellm.kv_transfer.base import KVConnectorBase


class SchedulerKVLoads:
    """Background KV loads: started at admission, finished from the workers' reports."""

    def _start_kv_load(self, req: Request, prefix: list, offloaded: list, num_hit: int,
                       num_ext: int) -> bool:
        """Blocks for the request's hit (``num_hit`` tokens, the last ``num_ext`` of them from
        the connector) and its load started; False (nothing changed) when the blocks are not
        there."""
        if type(self.connector).get_finished_loads is KVConnectorBase.get_finished_loads:
            raise ValueError(f"KV connector {type(self.connector).__name__} loads in the "
                             "background (get_num_new_matched_tokens returned (n, True)) but has "
                             "no get_finished_loads of its own, so no load would ever be reported "
                             "and its requests would wait forever; implement get_finished_loads "
                             "(tessellm/kv_transfer/base.py) or return a plain count.")
        block_ids = self.kv.allocate(req, num_ext, prefix, offloaded)
        if block_ids is None:
            return False
        if self.kv.enable_prefix_caching:
            self.kv.stats.record(req.num_tokens, len(prefix) * self.kv.block_size)
            if self.kv.host is not None:
                self.kv.host.stats.queries += req.num_tokens
                self.kv.host.stats.hits += len(offloaded) * self.kv.block_size
        self.connector.stats.record_lookup(req.request_id, req.num_tokens, num_ext)
        first = (num_hit - num_ext) // self.kv.block_size
        self.connector.update_state_after_alloc(req, self.kv.block_ids(req.request_id), first,
                                                num_ext // self.kv.block_size)
        req.num_computed_tokens += num_hit
        self._note_cached(req, num_hit, len(offloaded) * self.kv.block_size + num_ext)
        if req.scheduled_ts is None:  # its first admission (not again after a failed load)
            req.first_scheduled_time, req.scheduled_ts = time.time(), time.monotonic()
        req.kv_loading = True
        self.kv_loading[req.request_id] = req
        return True

    def _note_cached(self, req: Request, num_hit: int, num_external: int) -> None:
        """At its first admission (again after a failed load): its prompt tokens not computed
        (``num_hit``), ``num_external`` of them from the host tier or the connector, and the
        cached ones it computes anyway (the front end's ``prompt_tokens_by_source``)."""
        if req.num_cached_tokens < 0:
            req.num_cached_tokens, req.num_external_tokens = num_hit, num_external
            if not req.computes_every_prompt_token:  # those look nothing up: none recomputed
                req.num_recomputed_tokens = self.kv.num_recomputed(req, num_hit)

    def kv_poll_meta(self) -> Optional[dict]:
        """The metadata of a step with nothing to compute (the engine only waits for
        background loads): loads to start, and the loads to ask about."""
        if self.connector is None or not self.kv_loading:
            return None
        from tessellm.core.step import SchedulerOutput

        meta = self.connector.build_connector_meta(SchedulerOutput([], [], {}, 0, {}, {}),
                                                   self.requests, self.kv.block_ids)
        return self._with_check(meta)

    def _with_check(self, meta: Optional[dict]) -> Optional[dict]:
        if not self.kv_loading:
            return meta
        return {**(meta or {}), "check": sorted(self.kv_loading)}

    def finish_kv_loads(self, finished: dict) -> None:
        """Background loads the workers reported: request id -> loaded (True) or failed."""
        for rid, ok in finished.items():
            req = self.kv_loading.pop(rid, None)
            if req is None:
                continue  # reported again by a step that was in flight
            req.kv_loading = False
            if req.is_finished:  # aborted while loading: its blocks are free to go now
                self.kv.free(req)
                continue
            if ok:
                self.kv.publish_full_blocks(req, req.num_computed_tokens)
                self.connector.stats.confirm(rid)
                continue
            req.kv_load_failed = True  # recomputed from its tokens, without the connector
            req.num_cached_tokens = -1
            req.num_computed_tokens = 0
            self.kv.free(req)
            self.connector.request_failed_load(req)
            self.connector.stats.record_failed_load(rid)

    def _free_waiting_blocks(self, req: Request) -> bool:
        """Blocks are short for ``req``: a loaded request waiting to run (it computed nothing
        yet) gives its blocks back, the newest first, before any running request is preempted.
        They stay in the prefix cache, so it finds what is not evicted by then again. False
        when no waiting request holds blocks (background loads under way keep theirs)."""
        for other in reversed(self.waiting):
            if (other is not req and not other.kv_loading and other.num_computed_tokens
                    and self.kv.block_ids(other.request_id)):
                self.kv.free(other)
                other.num_computed_tokens = 0
                return True
        return False
