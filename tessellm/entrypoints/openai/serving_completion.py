"""POST /v1/completions: prompts (text or token ids, one or many) to completions.

Choice ``index`` is ``prompt_index * n + sample_index``, as in the OpenAI API.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

from fastapi import Request

from tessellm.core.outputs import Logprob, RequestOutput
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.beam_search import beam_params, beam_search, beam_search_stream
from tessellm.entrypoints.openai.errors import bad_request, prompt_error
from tessellm.entrypoints.openai.output_so_far import RequestSoFar
from tessellm.entrypoints.openai.protocol import CompletionRequest
from tessellm.entrypoints.openai.protocol_responses import (CompletionChoice, CompletionLogProbs,
                                                            CompletionResponse)
from tessellm.entrypoints.openai.sampling import (check_kv_transfer_params, check_limits, check_model,
                                                  apply_server_defaults, check_unsupported,
                                                  resolve_max_tokens,
                                                  to_sampling_params)
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.structured import structured_from_request
from tessellm.entrypoints.openai.prompts import process_completion_prompt, truncation
from tessellm.entrypoints.openai.serving import (collect, finish_reason, parse_request,
                                                 json_logprob, prompt_logprobs, random_id, response_id,
                                                 sse_response, submit, token_string, usage)


async def create_completion(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    req: CompletionRequest = parse_request(CompletionRequest, body)
    lora = check_model(req.model, config)  # the adapter as served now
    check_unsupported(req)
    apply_server_defaults(req, config)
    check_kv_transfer_params(req, engine.info)
    check_limits(req, config, engine.info)
    keep = truncation(req, engine.info.max_model_len)
    if req.prompt_embeds is not None:  # as vLLM: the embeddings' prompts first, then prompt's
        prompts, processed = await _embeds_prompts(engine, req, keep, config.max_prompts)
        if req.prompt not in (None, "", []):
            prompts += _prompt_list(req.prompt, config.max_prompts)
        if len(prompts) > config.max_prompts:
            raise bad_request(f"The request has {len(prompts)} prompts, over this server's limit of "
                              f"{config.max_prompts} (--max-prompts).", "prompt")
    else:
        prompts, processed = _prompt_list(req.prompt, config.max_prompts), []
    for i, prompt in enumerate(prompts[len(processed):]):
        try:
            processed.append(await process_completion_prompt(engine, prompt, req, keep))
        except ValueError as exc:
            raise prompt_error(exc, "prompt", None if len(prompts) == 1 else f"prompt {i}: {exc}") from None
    max_len = engine.info.max_model_len
    structured = structured_from_request(req)
    defaults = engine.info.default_sampling
    params = [to_sampling_params(req, resolve_max_tokens(req, len(p.prompt_token_ids), max_len, config, defaults),
                                 engine.info.vocab_size, structured, defaults) for p in processed]
    request_id = random_id("cmpl")
    view = _CompletionView(engine, req, lora.lora_name if lora else config.model_name,
                           response_id("cmpl", req, request_id), [_prompt_text(engine, p) for p in processed])
    view.usage_details = config.prompt_tokens_details
    if req.use_beam_search:  # n is the beam width (openai/beam_search.py)
        beams = [beam_params(req, p.max_tokens, defaults, structured) for p in params]
        if req.stream:
            return beam_search_stream(engine, processed, beams, lora, req.cache_salt, http_request,
                                      config.sse_keepalive_s, _CompletionChunks(view, len(prompts)),
                                      req.stream_options, req.priority)
        return view.response(await beam_search(engine, processed, beams, lora, req.cache_salt, http_request,
                                               config.sse_keepalive_s, req.priority))
    sub = submit(engine, request_id, processed, params, lora, req.cache_salt, req.priority)
    if req.stream:
        return sse_response(engine, sub, _CompletionChunks(view, len(prompts)), config.sse_keepalive_s,
                            req.stream_options)
    outputs = await collect(engine, sub, http_request, config.sse_keepalive_s)
    return view.response([view.visible(o) for o in outputs])


async def _embeds_prompts(engine: AsyncLLM, req: CompletionRequest, keep, max_prompts: int):
    """``prompt_embeds`` (one base64 string or a list): each decoded and checked as a prompt
    (placeholders ``None`` in the prompt list: they are processed already)."""
    from tessellm.core.prompt_embeds import decode_base64_tensor

    if req.echo:
        raise bad_request("echo needs prompt text; a prompt_embeds prompt has none.", "echo")
    if req.use_beam_search:
        raise bad_request("Beam search extends prompts by token ids; it does not take prompt_embeds.",
                          "use_beam_search")
    if keep is not None:
        raise bad_request("truncate_prompt_tokens does not apply to prompt_embeds; send fewer rows.",
                          "truncate_prompt_tokens")
    items = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) else list(req.prompt_embeds)
    if not items:
        raise bad_request("prompt_embeds is empty; give base64 torch.save(tensor) bytes.", "prompt_embeds")
    if len(items) > max_prompts:
        raise bad_request(f"The request has {len(items)} prompts, over this server's limit of "
                          f"{max_prompts} (--max-prompts).", "prompt_embeds")
    processed = []
    for i, item in enumerate(items):
        try:
            tensor = await engine.run_off_loop(decode_base64_tensor, item)
            processed.append(await engine.process_prompt_async({"prompt_embeds": tensor}))
        except ValueError as exc:
            raise prompt_error(exc, "prompt_embeds", None if len(items) == 1 else f"prompt_embeds {i}: {exc}") from None
    return [None] * len(processed), processed


def _prompt_list(prompt, max_prompts: int) -> list:
    """str | [str] | [int] | [[int]] -> a list of prompts (str or token-id list)."""
    if prompt is None:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [{"prompt_token_ids": list(prompt)}]
    else:
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompt]
    if not prompts:
        raise bad_request("prompt is empty; give a string, a list of strings or token ids.", "prompt")
    if len(prompts) > max_prompts:
        raise bad_request(f"The request has {len(prompts)} prompts, over this server's limit of "
                          f"{max_prompts} (--max-prompts).", "prompt")
    return prompts


def _without_generation(out: RequestOutput) -> RequestOutput:
    """echo with max_tokens 0: the one token sampled (for the prompt's logprobs) is dropped."""
    outputs = [replace(co, text="", token_ids=[], logprobs=[], cumulative_logprob=None,
                       finish_reason="length" if out.finished else None) for co in out.outputs]
    return replace(out, outputs=outputs)


def _kv_transfer_params(outputs: list[RequestOutput]) -> Optional[dict]:
    """The response's kv_transfer_params (vLLM's: the first prompt's; a proxy sends one)."""
    return next((o.kv_transfer_params for o in outputs if o.kv_transfer_params), None)


def _prompt_text(engine: AsyncLLM, processed) -> str:
    if processed.prompt is not None:
        return processed.prompt
    if engine.tokenizer is None or processed.prompt_embeds is not None:
        return ""
    return engine.tokenizer.decode(processed.prompt_token_ids)


class _CompletionView:
    """Builds response objects from RequestOutputs."""

    def __init__(self, engine: AsyncLLM, req: CompletionRequest, model: str, request_id: str,
                 prompt_texts: list[str]):
        self.engine = engine
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.n = req.n or 1
        self.prompt_texts = prompt_texts
        self.usage_details = False  # --enable-prompt-tokens-details

    def visible(self, out: RequestOutput) -> RequestOutput:
        return _without_generation(out) if self.req.echo_only else out

    def response(self, outputs: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for pi, out in enumerate(outputs):
            for co in out.outputs:
                text, logprobs = co.text, None
                if self.req.logprobs is not None:
                    logprobs = CompletionLogProbs()
                if self.req.echo:
                    text = self.prompt_texts[pi] + text
                    if logprobs is not None:
                        self.add_logprobs(logprobs, out.prompt_token_ids, out.prompt_logprobs or [], 0,
                                          self.req.logprobs)
                if logprobs is not None:
                    offset = len(self.prompt_texts[pi]) if self.req.echo else 0
                    self.add_logprobs(logprobs, co.token_ids, co.logprobs or [], offset)
                ids = self.req.return_token_ids
                choices.append(CompletionChoice(index=pi * self.n + co.index, text=text, logprobs=logprobs,
                                                finish_reason=finish_reason(co.finish_reason),
                                                stop_reason=co.stop_reason,
                                                prompt_logprobs=prompt_logprobs(out, self.req.prompt_logprobs),
                                                prompt_token_ids=list(out.prompt_token_ids) if ids else None,
                                                token_ids=list(co.token_ids) if ids else None))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=usage(outputs, self.usage_details),
                                  kv_transfer_params=_kv_transfer_params(outputs))

    def add_logprobs(self, lp: CompletionLogProbs, token_ids, entries, offset: int,
                     top_k: Optional[int] = None) -> int:
        """Append one entry per token; returns the text offset after the last one. ``top_k``:
        keep only that many top entries (besides the token itself; the prompt's entries may hold
        more when prompt_logprobs is over logprobs)."""
        for i, tid in enumerate(token_ids):
            entry: Optional[dict[int, Logprob]] = entries[i] if i < len(entries) else None
            token = self._token(tid, entry)
            lp.tokens.append(token)
            lp.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(json_logprob(entry[tid].logprob) if tid in entry else None)
            if top_k is None and self.req.logprob_token_ids:  # vLLM's: all of them, the token first
                top = list(entry.items())
            else:
                top = sorted(((t, l) for t, l in entry.items()
                              if top_k is None or t == tid or (l.rank or 0) <= top_k),
                             key=lambda kv: kv[1].rank or 0)
            lp.top_logprobs.append({self._token(t, entry): json_logprob(l.logprob) for t, l in top})
        return offset

    def _token(self, tid: int, entry) -> str:
        return token_string(self.engine, tid, entry.get(tid) if entry is not None else None,
                            self.req.return_tokens_as_token_ids)


class _CompletionChunks:
    """Stream rendering of DELTA outputs (serving.py; a beam search's one finished output per
    prompt is its own delta): per choice, what each output adds, the echoed prompt before its
    first text; the totals (usage, the prompt's logprobs) kept in ``RequestSoFar``."""

    def __init__(self, view: _CompletionView, num_prompts: int):
        self.view = view
        self.so_far = [RequestSoFar() for _ in range(num_prompts)]
        self.started: set[int] = set()  # choices that had their first chunk
        self.done: set[int] = set()  # choices that had their finish_reason
        self.offsets: dict[int, int] = {}

    def start(self):
        return []

    def update(self, pi: int, out: RequestOutput):
        view, chunks, so_far = self.view, [], self.so_far[pi]
        if view.req.echo_only and not out.finished:
            so_far.keep_prompt_logprobs(out)  # DELTA: in the first output only
            return []
        out = view.visible(out)
        so_far.add(out)
        for co in out.outputs:
            index = pi * view.n + co.index
            first = index not in self.started
            text, new_ids, done = co.text, co.token_ids, finish_reason(co.finish_reason)
            if index in self.done or not (first or text or new_ids or done):
                continue
            logprobs = None
            if view.req.logprobs is not None:
                logprobs = CompletionLogProbs()
                offset = self.offsets.get(index, 0)
                if first and view.req.echo:
                    offset = view.add_logprobs(logprobs, out.prompt_token_ids, so_far.prompt_logprobs or [], 0,
                                               view.req.logprobs)
                self.offsets[index] = view.add_logprobs(logprobs, new_ids, co.logprobs or [], offset)
            if first and view.req.echo:
                text = view.prompt_texts[pi] + text
            self.started.add(index)
            if done:
                self.done.add(index)
            options, ids = view.req.stream_options, view.req.return_token_ids
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=done,
                                      stop_reason=co.stop_reason if done else None,
                                      prompt_token_ids=list(out.prompt_token_ids) if ids and first else None,
                                      token_ids=list(new_ids) if ids else None)
            num_tokens = len(so_far.choice(co.index).token_ids)
            chunks.append(CompletionResponse(
                id=view.id, created=view.created, model=view.model, choices=[choice],
                usage=options.usage_now(len(out.prompt_token_ids), num_tokens) if options else None))
        return chunks

    def finish(self):
        req = self.view.req
        if not (req.stream_options and req.stream_options.include_usage):
            return []
        view = self.view
        finals = [s.output() for s in self.so_far if s.finished]
        return [CompletionResponse(id=view.id, created=view.created, model=view.model, choices=[],
                                   usage=usage(finals, view.usage_details))]
