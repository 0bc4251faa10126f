"""The scheduler's LoRA accounting (``Scheduler.lora``, a ``LoRASlots``), kept out of its loop.

``acquire_slot`` at admission, ``release_slot`` at finish and preemption, ``lora_step_fields``
once per step (each scheduled request's slot and the slots to load first).
"""

from __future__ import annotations

from tessellm.core.engine_output import EngineCoreOutput
from tessellm.lora.slots import FAILED, WAIT

LORA_WAIT = WAIT


def lora_stats(scheduler) -> dict:
    """What vLLM's ``lora_requests_info`` gauge tells a router: the adapters of the running and
    of the waiting requests (each name once, in queue order) and the adapter slots
    (``max_loras``). Once per stats message, with LoRA on: a pass over the queues."""
    return {"running": _adapter_names(scheduler.running), "waiting": _adapter_names(scheduler.waiting),
            "max_lora": len(scheduler.lora.slot_ids)}


def _adapter_names(requests) -> list[str]:
    return list(dict.fromkeys(r.lora_request.lora_name for r in requests if r.lora_request is not None))


def acquire_slot(scheduler, req) -> int:
    """The request's slot (>= 0), LORA_WAIT, or FAILED (then the request is finished with the
    adapter's load error as its abort)."""
    if req.lora_slot >= 0:
        return req.lora_slot
    slots = scheduler.lora
    if slots is None:
        raise ValueError("A request names a LoRA adapter but the engine runs without LoRA; "
                         "start it with enable_lora=True (--enable-lora).")
    slot = slots.acquire(req.lora_request)
    if slot == FAILED:
        from tessellm.core.request import RequestStatus

        req.stop_reason = slots.store.error(req.lora_request.lora_int_id)
        scheduler._finish(req, RequestStatus.FINISHED_ABORTED)
        scheduler.finished_outputs.append(EngineCoreOutput(req.request_id, [], "abort",
                                                           req.stop_reason))
        return FAILED
    if slot >= 0:
        req.lora_slot = slot
    return slot


def release_slot(scheduler, req) -> None:
    if req.lora_slot >= 0 and scheduler.lora is not None:
        scheduler.lora.release(req.lora_slot)
    req.lora_slot = -1


def lora_step_fields(scheduler, out) -> None:
    """Fill ``out.lora_slots`` (request id -> slot, adapters only) and ``out.lora_loads``. An
    empty step never reaches the runner: its loads wait for the next step that does."""
    if out.is_empty:
        return
    requests = scheduler.requests
    out.lora_slots = {rid: requests[rid].lora_slot for rid in out.num_scheduled_tokens
                      if requests[rid].lora_slot >= 0}
    out.lora_loads = scheduler.lora.take_loads()
    out.lora_prefetch = scheduler.lora.take_prefetch()
    out.lora_unloads = scheduler.lora.take_unloads()
