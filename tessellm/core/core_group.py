"""The engine cores behind one front end: one, or ``data_parallel_size`` of them on one host.

Each core is a whole engine in its own process (``engine_process.run_engine_core``): its own
scheduler, KV cache and device group (rank r on devices ``r*world .. r*world+world-1``,
``world`` = tensor x pipeline parallel size; on the cpu backend they share the host, its
threads divided between them). The front end (``AsyncLLM`` for the server, ``DPLLMEngine`` for
``LLM(data_parallel_size=N)``) tokenizes once and sends each core request to one core::

    front end --add--> LoadBalancer.pick --> core 0 | core 1 | ... (own sockets each)
              <--outputs, stats, warm, dead-- (read per core, tagged with its index;
                 each stats message carries the core's load figures and its prefix
                 cache's changes: note_stats)

Invariants:

* Every core request has one owner core (``LoadBalancer.owner``) from ``send_add`` until it
  finishes (``note_outputs``), is aborted (``send_abort`` sends each id to its owner only) or
  is rejected (``release``); the loads the balancer weighs are exactly these.
* Whatever every core must know goes to every core: ``send_remove_lora`` (an adapter's requests
  carry its path, so a core loads it when one arrives), ``shutdown``.
* The group starts every core before waiting for any, and waits for all: a core that fails to
  start stops the others and raises its error. Later, a core that dies is the front end's to
  notice (``dead_core``): it fails the whole engine, never just waits for its outputs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from typing import Optional

from tessellm.config import EngineArgs
from tessellm.core.core_stop import CLOSE_WAIT_S
from tessellm.core.engine_core import EngineCoreRequest, EngineInfo
from tessellm.core.engine_process import EngineCoreClient, EngineStartupError
from tessellm.core.load_balance import LoadBalancer, iter_request_block_hashes
from tessellm.core.outputs import RequestOutput
from tessellm.metrics.stats import EngineStats, merge_engine_stats


class EngineCoreGroup:
    def __init__(self, args: EngineArgs, serving: bool = True, startup_timeout: float = 1800.0):
        args.validate()
        self.size = args.data_parallel_size
        self.clients: list[EngineCoreClient] = []
        try:
            for rank in range(self.size):
                self.clients.append(EngineCoreClient(dataclasses.replace(args, data_parallel_rank=rank),
                                                     startup_timeout, wait=False, serving=serving))
            self._handshake(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.info: EngineInfo = self.clients[0].info
        self.balancer = LoadBalancer(self.size, self.info.block_size, policy=args.data_parallel_balance)
        self.stats: list[dict] = [{} for _ in range(self.size)]  # each core's last EngineStats
        self.warm = [False] * self.size  # each core's warm-up is done ("warm")
        self.warmup_reports: list[dict] = [{} for _ in range(self.size)]

    def _handshake(self, timeout: float) -> None:
        """Wait for every core's ``ready``; the first failure raises (naming the core)."""
        deadline = time.monotonic() + timeout
        waiting = list(range(self.size))
        while waiting:
            if time.monotonic() > deadline:
                raise EngineStartupError(f"The engine core did not start within {timeout:.0f}s.")
            for rank in list(waiting):
                try:
                    if self.clients[rank].poll_ready(500 // len(waiting)):
                        waiting.remove(rank)
                except EngineStartupError as exc:
                    if self.size > 1:
                        raise EngineStartupError(f"Data-parallel engine core {rank} of {self.size}: "
                                                 f"{exc}") from None
                    raise

    # -- requests ----------------------------------------------------------------------------

    def send_add(self, req: EngineCoreRequest) -> None:
        lora_id = req.lora_request["id"] if req.lora_request else None  # LoRARequest.to_dict()
        hashes = iter_request_block_hashes(req, self.balancer.block_size) if self.balancer.affinity else None
        core = self.balancer.pick(req.prompt_token_ids, lora_id, req.cache_salt, block_hashes=hashes)
        self.clients[core].send_add(req)
        self.balancer.assign(req.request_id, core, len(req.prompt_token_ids))

    def send_abort(self, core_request_ids: list[str]) -> None:
        """Each id to the core that has it; ids already finished are dropped."""
        by_core: dict[int, list[str]] = defaultdict(list)
        for rid in core_request_ids:
            core = self.balancer.release(rid)
            if core is not None:
                by_core[core].append(rid)
        for core, ids in by_core.items():
            self.clients[core].send_abort(ids)

    def release(self, core_request_id: str) -> None:
        """The core rejected it (it holds nothing for it)."""
        self.balancer.release(core_request_id)

    def note_outputs(self, outputs) -> None:
        """The cores' outputs have reached the front end: their tokens add to their core's
        load; the finished ones leave it."""
        for out in outputs:
            if out.finish_reason is not None:
                self.balancer.release(out.request_id)
            else:
                self.balancer.generated(out.request_id, len(out.new_token_ids))

    def note_stats(self, core: int, stats: dict) -> None:
        """A core's stats from its latest outputs message; their load figures and prefix-cache
        changes go to the balancer (``load_report.core_load``, ``cache_view.CacheEvents``)."""
        events = stats.pop("prefix_events", None)
        self.stats[core] = stats
        self.balancer.report(core, stats.get("load"), events)

    def send_remove_lora(self, lora_id: int) -> None:
        for client in self.clients:
            client.send_remove_lora(lora_id)

    def send_call(self, core: int, call_id: int, method: str, args: Optional[list] = None) -> None:
        self.clients[core].send_call(call_id, method, args)

    # -- state -------------------------------------------------------------------------------

    def owner(self, core_request_id: str) -> Optional[int]:
        return self.balancer.owner.get(core_request_id)

    def loads(self) -> list[int]:
        """Core requests in each core now (queued or running), as the front end counts them."""
        return list(self.balancer.num_requests)

    def token_loads(self) -> list[int]:
        """Tokens of those requests in each core (prompt + generated): what the balancer weighs."""
        return list(self.balancer.load)

    def merged_stats(self) -> EngineStats:
        """The cores' last stats as one engine's (``merge_engine_stats``)."""
        return merge_engine_stats([EngineStats.from_dict(s) for s in self.stats])

    def dead_core(self) -> Optional[str]:
        """Why a core is gone ("engine core 1 of 2 exited with code -9"), None while all run."""
        for rank, client in enumerate(self.clients):
            if not client.is_alive():
                return f"{self.name(rank)} process exited with code {client.exit_code()}"
        return None

    def is_alive(self) -> bool:
        return all(client.is_alive() for client in self.clients)

    def name(self, rank: int) -> str:
        return f"engine core {rank} of {self.size}" if self.size > 1 else "engine core"

    def pids(self) -> list[int]:
        return [client.proc.pid for client in self.clients]

    def close(self) -> None:
        """Stop every core (idempotent): all are asked first, so they wind down together
        rather than one after the other."""
        for client in self.clients:
            client.request_stop()
        deadline = time.monotonic() + CLOSE_WAIT_S  # one wait for all, as they stop together
        for client in self.clients:
            client.close(max(0.0, deadline - time.monotonic()))


# -- front-end helpers shared by AsyncLLM and DPLLMEngine -------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_front_tokenizer(info: EngineInfo, args: EngineArgs):
    """The model's tokenizer for the front end (None for a model without one)."""
    from tessellm.loader.model_loader import load_tokenizer

    if args.tokenizer or info.model_kind == "gguf":
        return load_tokenizer(info.model_path, info.model_kind, args.tokenizer)
    if any(os.path.exists(os.path.join(info.model_path, f)) for f in _TOKENIZER_FILES):
        return load_tokenizer(info.model_path, info.model_kind, None)
    return None


def core_refusal(result) -> Optional[str]:
    """Why the core ended a sample of ``result`` (an abort it was not asked for: a request
    aborted in the front end has no stream any more), or None. The core names the reason
    (stop_reason), e.g. a LoRA adapter that failed to load there."""
    if not isinstance(result, RequestOutput):
        return None  # a pooling request's output (tessellm.pooling.outputs)
    for sample in result.outputs:
        if sample.finish_reason == "abort" and isinstance(sample.stop_reason, str):
            return sample.stop_reason
    return None
