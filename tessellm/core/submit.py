"""One way in for a request, shared by ``LLMEngine`` (offline) and ``AsyncLLM`` (the server).

Tokenize and check the prompt, refuse an id in use, fan out ``n`` samples, register them with
the output processor, then hand each core request to ``send`` (the in-process core's
``add_request``, or the engine-process client's ``send_add``). Bad input raises ValueError with
nothing queued; so does a ``send`` that fails part-way (the samples already sent are aborted).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from tessellm.core.engine_core import EngineCoreRequest
from tessellm.core.input_processor import InputProcessor, ProcessedPrompt, PromptType
from tessellm.core.output_processor import OutputProcessor
from tessellm.core.sampling_params import SamplingParams


def submit(inputs: InputProcessor, outputs: OutputProcessor, request_id: str,
           prompt: Union[PromptType, ProcessedPrompt], params: SamplingParams,
           send: Callable[[EngineCoreRequest], None], in_use: bool = False,
           lora_request=None,
           abort: Optional[Callable[[list[str]], None]] = None,
           pooling=None, priority: int = 0) -> list[EngineCoreRequest]:
    """Queue one request; ``in_use``: the caller already holds ``request_id`` (a stream);
    ``lora_request``: its adapter (``tessellm.lora.LoRARequest``) or None; ``abort``: frees
    core request ids in the core (used when ``send`` raises after some samples went);
    ``priority``: vLLM's (scheduling_policy "priority": lower first)."""
    processed = prompt if isinstance(prompt, ProcessedPrompt) else inputs.process_prompt(
        prompt, getattr(params, "truncate_prompt_tokens", None))  # vLLM's SamplingParams field
    if in_use or outputs.has_request(request_id):
        raise ValueError(f"Request id {request_id!r} is already in use.")
    core_reqs = inputs.make_requests(request_id, processed, params, lora_request=lora_request,
                                     priority=priority)
    if pooling is not None:  # the core pools it as its task says (tessellm.pooling.pooler)
        for req in core_reqs:
            req.pooling_task = pooling.task
    outputs.add_request(request_id, processed.prompt, processed.prompt_token_ids, params,
                        [r.request_id for r in core_reqs], core_reqs[0].arrival_time, pooling,
                        lora_request)
    sent: list[str] = []
    try:
        for req in core_reqs:
            send(req)
            sent.append(req.request_id)
    except BaseException:
        outputs.abort(request_id)  # registered above: nothing may wait for it
        if sent and abort is not None:
            abort(sent)
        raise
    return core_reqs
