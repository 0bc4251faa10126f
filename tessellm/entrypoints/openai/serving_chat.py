"""POST /v1/chat/completions: messages through the model's chat template, then generation.

The prompt is rendered by ``render_chat`` (the same function ``LLM.chat`` uses), so greedy
output here equals ``LLM.chat``'s for the same messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from fastapi import Request

from tessellm.core.input_processor import ProcessedPrompt
from tessellm.core.outputs import Logprob, RequestOutput
from tessellm.core.sampling_params import SamplingParams
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.chat_utils import RESERVED_TEMPLATE_KWARGS, render_chat
from tessellm.entrypoints.openai.beam_search import beam_params, beam_search, beam_search_stream
from tessellm.entrypoints.openai.errors import bad_request, prompt_error
from tessellm.entrypoints.openai.harmony import TOOL_PARSER, HarmonyPlan, HarmonyStream, harmony_on
from tessellm.entrypoints.openai.harmony import template_tools as harmony_template_tools
from tessellm.entrypoints.openai.output_so_far import RequestSoFar
from tessellm.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from tessellm.entrypoints.openai.protocol_responses import (ChatChoice, ChatChoiceLogProbs,
                                                            ChatCompletionChunk, ChatCompletionResponse,
                                                            ChatLogProb, ChatLogProbTop,
                                                            ChatResponseMessage, ChatStreamChoice,
                                                            DeltaMessage)
from tessellm.entrypoints.openai.reasoning import ReasoningPlan, ReasoningStream
from tessellm.entrypoints.openai.sampling import (apply_server_defaults, check_kv_transfer_params,
                                                  check_limits, check_model, check_unsupported,
                                                  merged_template_kwargs, reasoning_template_kwargs,
                                                  request_chat_template, resolve_max_tokens,
                                                  to_sampling_params)
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.structured import structured_from_request
from tessellm.entrypoints.openai.tools import ToolPlan, tool_call_history
from tessellm.structured_output.params import StructuredOutputsParams
from tessellm.multimodal.chat import (chat_prompt_with_images, count_images, fetch_chat_images,
                                      media_data, media_items)
from tessellm.entrypoints.openai.prompts import truncate, truncation
from tessellm.entrypoints.openai.serving import (collect, finish_reason, parse_request,
                                                 json_logprob, prompt_logprobs, random_id, response_id,
                                                 sse_response, submit, token_string, usage)


async def create_chat_completion(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
    job = await prepare_chat(engine, config, req)
    view, processed, lora = job.view, job.processed, job.lora
    if req.use_beam_search:  # n is the beam width (openai/beam_search.py)
        beams = [beam_params(req, job.max_tokens, engine.info.default_sampling, job.structured)]
        if req.stream:
            return beam_search_stream(engine, [processed], beams, lora, req.cache_salt, http_request,
                                      config.sse_keepalive_s, _ChatChunks(view), req.stream_options,
                                      req.priority)
        outputs = await beam_search(engine, [processed], beams, lora, req.cache_salt, http_request,
                                    config.sse_keepalive_s, req.priority)
        return view.response(outputs[0])
    sub = submit(engine, job.request_id, [processed], [job.params], lora, req.cache_salt, req.priority)
    if req.stream:
        return sse_response(engine, sub, _ChatChunks(view), config.sse_keepalive_s, req.stream_options)
    outputs = await collect(engine, sub, http_request, config.sse_keepalive_s)
    return view.response(outputs[0])


@dataclass
class ChatJob:
    """A chat request ready to submit (what /v1/responses shares with /v1/chat/completions)."""

    req: ChatCompletionRequest
    lora: object  # the LoRA adapter the model name selects (None: the base model)
    processed: ProcessedPrompt  # the rendered, truncated prompt
    params: SamplingParams
    max_tokens: int
    structured: Optional[StructuredOutputsParams]
    request_id: str  # the engine's id
    view: "_ChatView"  # renders outputs as a message (``response``) or stream chunks (``chunks``)

    def chunks(self) -> "_ChatChunks":
        return _ChatChunks(self.view)


async def prepare_chat(engine: AsyncLLM, config: ServerConfig, req: ChatCompletionRequest,
                       id_prefix: str = "chatcmpl") -> ChatJob:
    """Validate, render and tokenize ``req``; its sampling params, tool, reasoning and harmony
    plans. A 400 (OpenAIError) names the chat field at fault."""
    lora = check_model(req.model, config)  # the adapter as served now
    check_unsupported(req)
    apply_server_defaults(req, config)
    template = request_chat_template(req, config)
    check_kv_transfer_params(req, engine.info)
    check_limits(req, config, engine.info)
    harmony = harmony_on(engine, config.tool_call_parser)  # gpt-oss (openai/harmony.py)
    plan = ToolPlan(req, TOOL_PARSER if harmony else config.tool_call_parser, engine.tokenizer,
                    config.tool_parser_plugin)
    structured = structured_from_request(req, plan.forced_schema())
    images: list = []  # image_url parts, loaded (docs/multimodal.md)
    template_kwargs = merged_template_kwargs(req.chat_template_kwargs, config)
    template_kwargs = reasoning_template_kwargs(req, template_kwargs, harmony)  # + enable_thinking
    tools = harmony_template_tools(plan.template_tools()) if harmony else plan.template_tools()
    if config.exclude_tools_when_tool_choice_none and req.tool_choice == "none":
        tools = None  # vLLM's --exclude-tools-when-tool-choice-none
    keep = truncation(req, engine.info.max_model_len)
    ids = await render_messages(engine, req.messages, req.add_generation_prompt, template,
                                tools, continue_final_message=req.continue_final_message,
                                template_kwargs=template_kwargs,
                                check_fits=req.truncate_prompt_tokens is None, images=images,
                                add_special_tokens=req.add_special_tokens, documents=_documents(req.documents),
                                content_format=config.chat_template_content_format,
                                keep=keep if req.truncation_side is None else None)
    try:
        ids = truncate(ids, keep, req.truncation_side)
        if images:  # the image processor runs off the event loop
            processed = await engine.process_prompt_async({"prompt_token_ids": ids,
                                                           "multi_modal_data": media_data(images),
                                                           "mm_processor_kwargs": req.mm_processor_kwargs})
        else:
            processed = engine.process_prompt({"prompt_token_ids": ids})
    except ValueError as exc:
        raise prompt_error(exc, "messages") from None
    defaults = engine.info.default_sampling
    max_tokens = resolve_max_tokens(req, len(ids), engine.info.max_model_len, config, defaults)
    params = to_sampling_params(req, max_tokens, engine.info.vocab_size, structured, defaults)
    if plan.parser is not None and plan.parser.needs_special_tokens:
        params.skip_special_tokens = False  # the parser's markers are special tokens
    reasoning = None if harmony else ReasoningPlan.for_request(engine, req, processed.prompt_token_ids,
                                                                 template_kwargs)
    if reasoning is not None:
        reasoning.adjust(params)
        reasoning.read_by(plan.parser)
        plan.after_thinking(reasoning.kept_ends)
    harmony_plan = None
    if harmony:
        harmony_plan = HarmonyPlan(plan, req.include_reasoning, engine.tokenizer, processed.prompt_token_ids)
        harmony_plan.adjust(params, engine.tokenizer)
    request_id = random_id(id_prefix)
    view = _ChatView(engine, req, lora.lora_name if lora else config.model_name,
                     response_id(id_prefix, req, request_id), plan, reasoning)
    view.harmony = harmony_plan
    # vLLM's: the reply's role is --response-role after a generation prompt, else the last message's
    view.role = config.response_role if req.add_generation_prompt else req.messages[-1].role
    view.echo = _echo_text(req, view.role)
    view.usage_details = config.prompt_tokens_details
    view.prompt_tokens = len(processed.prompt_token_ids)
    view.prompt_ids = processed.prompt_token_ids
    return ChatJob(req, lora, processed, params, max_tokens, structured, request_id, view)


def _documents(documents) -> Optional[list[dict]]:
    """vLLM's chat field ``documents``: a list of objects (e.g. ``{"title": ..., "text": ...}``)
    for the chat template."""
    if documents is None:
        return None
    if not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
        raise bad_request("documents must be a list of objects, e.g. [{\"title\": \"...\", \"text\": \"...\"}].",
                          "documents")
    return documents


MEDIA_PARTS = ("image_url", "video_url", "input_audio", "audio_url")  # docs/multimodal.md


def _image_or_text_part(i: int, j: int, part) -> dict:
    """A content part of a message with images, as the template (and chat_prompt_with_images)
    takes it."""
    if part.type == "text" and part.text is not None:
        return {"type": "text", "text": part.text}
    media = part.type in MEDIA_PARTS
    spec = (part.model_extra or {}).get(part.type) if media else None
    if spec is not None:
        return {"type": part.type, part.type: spec}
    raise bad_request(f"messages[{i}].content[{j}] has type '{part.type}'"
                      + (f" but no {part.type}" if media else "")
                      + "; give text, image_url, video_url, input_audio or audio_url parts.",
                      f"messages.{i}.content.{j}",
                      "invalid_value" if media else "unsupported_parameter")


def _echo_text(req: ChatCompletionRequest, role: str) -> str:
    """vLLM's chat ``echo``: the last message's text (text parts joined by newlines) when it has
    the reply's role, i.e. the reply continues it (``continue_final_message``); else nothing."""
    last = req.messages[-1]
    if not req.echo or last.role != role or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(p.text for p in last.content if p.text is not None)


def _text_len(content) -> int:
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content)
    return len(content)


async def render_messages(engine: AsyncLLM, messages: list[ChatMessage], add_generation_prompt: bool,
                          chat_template: Optional[str], tools: Optional[list[dict]] = None,
                          continue_final_message: bool = False,
                          template_kwargs: Optional[dict] = None, check_fits: bool = True,
                          images: Optional[list] = None, add_special_tokens: bool = False,
                          documents: Optional[list[dict]] = None, content_format: str = "auto",
                          keep: Optional[int] = None) -> list[int]:
    """The messages through the chat template (``chat_utils.render_chat``), off the event loop.
    ``images``: a list that receives the messages' images (``image_url`` parts, in order, then
    the videos of ``video_url`` parts: ``media_data`` splits them; the
    ids hold one placeholder each); None refuses image parts. ``add_special_tokens``: vLLM's
    field, the tokenizer's BOS etc. added to the rendered text. ``content_format``: the
    server's ``--chat-template-content-format``. ``keep``: the tokens a truncation keeps when
    the tokenizer cuts the text (no ``truncation_side``: a BOS it adds stays, as vLLM)."""
    if engine.tokenizer is None:
        raise bad_request("This model has no tokenizer, so chat is unavailable; use /v1/completions "
                          "with token ids.", "messages")
    conversation = [_message_dict(i, m) for i, m in enumerate(messages)]
    try:
        if check_fits:  # not when the prompt is to be truncated (the body limit bounds the text)
            engine.check_text_fits(sum(_text_len(m["content"]) for m in conversation), "The conversation")
    except ValueError as exc:
        raise prompt_error(exc, "messages") from None
    if continue_final_message and add_generation_prompt:
        raise bad_request("continue_final_message needs add_generation_prompt false (the last message is "
                          "continued, no new turn is opened).", "continue_final_message")
    bad = sorted(RESERVED_TEMPLATE_KWARGS & set(template_kwargs or {}))
    if bad:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(bad)}; use the request's own "
                          "fields.", "chat_template_kwargs")
    if count_images(conversation):
        if images is None:
            raise bad_request("Image content parts are not accepted here.", "messages")

        def render(conv):
            return render_chat(engine.tokenizer, conv, add_generation_prompt, chat_template, tools,
                               continue_final_message, template_kwargs, add_special_tokens, documents,
                               content_format)

        try:
            fetched = await fetch_chat_images(conversation, engine)
            prompt = await engine.run_off_loop(chat_prompt_with_images, conversation, engine.info,
                                               engine.tokenizer, render,
                                               engine.args.allowed_local_media_path,
                                               engine.args.allowed_media_domains, fetched)
        except ValueError as exc:
            raise prompt_error(exc, "messages") from None
        images.extend(media_items(prompt["multi_modal_data"]))  # videos too (media_data)
        return prompt["prompt_token_ids"]
    encode = None if keep is None or not add_special_tokens else (
        lambda text, add: engine.inputs.truncator.encode(engine.tokenizer, text, keep, add))
    try:
        return await engine.run_off_loop(render_chat, engine.tokenizer, conversation,
                                         add_generation_prompt, chat_template, tools,
                                         continue_final_message, template_kwargs, add_special_tokens,
                                         documents, content_format, encode)
    except Exception as exc:  # noqa: BLE001 - a template error is the request's fault (roles, ...)
        raise bad_request(f"The chat template could not render these messages: {exc}", "messages") from None


def _message_dict(i: int, m: ChatMessage) -> dict:
    for name in ("function_call", "audio"):
        if getattr(m, name) not in (None, []):
            raise bad_request(f"messages[{i}].{name} is not supported by tessellm yet.",
                              f"messages.{i}.{name}", "unsupported_parameter")
    if isinstance(m.content, list) and any(p.type in MEDIA_PARTS for p in m.content):
        content = [_image_or_text_part(i, j, p) for j, p in enumerate(m.content)]
    elif isinstance(m.content, list):
        texts = []
        for j, part in enumerate(m.content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{i}].content[{j}] has type '{part.type}'; content parts "
                                  "other than 'text' and 'image_url' are not supported by tessellm yet.",
                                  f"messages.{i}.content.{j}.type",
                                  "unsupported_parameter")
            texts.append(part.text)
        # parts: render_chat joins them ("\n", vLLM's "string" format) or keeps them ("openai")
        content = [{"type": "text", "text": t} for t in texts]
    else:
        content = m.content or ""
    message = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        message["tool_calls"] = tool_call_history(m.tool_calls)
    thinking = m.reasoning if m.reasoning is not None else m.reasoning_content
    if thinking is not None:  # Qwen3's and DeepSeek's templates read reasoning_content, gpt-oss's thinking
        message["reasoning"] = message["reasoning_content"] = message["thinking"] = thinking
    if m.role == "tool":
        if not m.tool_call_id:
            raise bad_request(f"messages[{i}] has role 'tool' but no tool_call_id; give the id of the "
                              "call it answers.", f"messages.{i}.tool_call_id")
        message["tool_call_id"] = m.tool_call_id
    return message


class _ChatView:
    def __init__(self, engine: AsyncLLM, req: ChatCompletionRequest, model: str, request_id: str,
                 plan: Optional[ToolPlan] = None, reasoning: Optional[ReasoningPlan] = None):
        self.plan = plan
        self.reasoning = reasoning  # --reasoning-parser: the thinking apart from the answer
        self.harmony: Optional[HarmonyPlan] = None  # gpt-oss: the output is harmony messages
        self.engine = engine
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.top = None if req.top_logprobs == -1 else req.top_logprobs or 0  # -1: all of them
        self.prompt_tokens = 0
        self.prompt_ids: list[int] = []
        self.role = "assistant"  # the reply's role (prepare_chat: --response-role)
        self.echo = ""  # vLLM's echo: text put before each choice's content (_echo_text)
        self.usage_details = False  # --enable-prompt-tokens-details

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for co in out.outputs:
            logprobs = None
            if self.req.logprobs:
                logprobs = ChatChoiceLogProbs(content=self.logprobs(co.token_ids, co.logprobs or []))
            message, reason = self.message(co.text, finish_reason(co.finish_reason), co.token_ids)
            message.role = self.role
            if self.echo:
                message.content = self.echo + (message.content or "")
            choices.append(ChatChoice(index=co.index, message=message, logprobs=logprobs,
                                      finish_reason=reason, stop_reason=co.stop_reason,
                                      token_ids=list(co.token_ids) if self.req.return_token_ids else None))
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=usage([out], self.usage_details),
            prompt_logprobs=prompt_logprobs(out, self.req.prompt_logprobs),
            prompt_token_ids=list(out.prompt_token_ids) if self.req.return_token_ids else None,
            kv_transfer_params=out.kv_transfer_params)

    def message(self, text: str, reason: Optional[str],
                token_ids=()) -> tuple[ChatResponseMessage, Optional[str]]:
        """The assistant message (reasoning, content and tool_calls) and the finish reason for
        ``text``; tool calls come from the answer after the reasoning only."""
        if self.harmony is not None:
            tools = self.harmony.view()
            content, calls = tools.final(text)
            thinking = tools.parser.reasoning
            if thinking is not None and not content and not calls:
                content = None  # as vLLM: the output ended with its reasoning
            return (ChatResponseMessage(content=content, tool_calls=calls, **self.harmony.fields(thinking)),
                    self.tool_reason(bool(calls), reason))
        extra, content = {}, text
        if self.reasoning is not None:
            thinking, content = self.reasoning.split().split(text, token_ids, final=True)
            extra = self.reasoning.fields(thinking)
            if thinking is not None and not content:
                content = None  # as vLLM: the output ended with its reasoning
        view = self.plan.view() if self.plan is not None else None
        if view is None:
            return ChatResponseMessage(content=content, **extra), reason
        parsed, calls = view.final(content or "")
        content = parsed if content is not None or calls else None  # all reasoning: none, as above
        if self.plan.mode == "named" and not calls:
            content = None  # an answer of only whitespace: no call and, as vLLM's, no content
        return (ChatResponseMessage(content=content, tool_calls=calls, **extra),
                self.tool_reason(bool(calls), reason))

    def tool_reason(self, has_calls: bool, reason: Optional[str]) -> Optional[str]:
        """OpenAI's: "tool_calls" when the model chose to call (not for a named tool_choice)."""
        if has_calls and reason == "stop" and self.plan.mode != "named":
            return "tool_calls"
        return reason

    def logprobs(self, token_ids, entries) -> list[ChatLogProb]:
        result = []
        for tid, entry in zip(token_ids, entries):
            chosen = entry.get(tid)
            if self.req.logprob_token_ids:  # vLLM's: all of them, the sampled token first
                top = list(entry.items())
            else:
                top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None),
                             key=lambda kv: kv[1].rank)[:self.top]
            token = self._text(tid, chosen)
            result.append(ChatLogProb(token=token, logprob=json_logprob(chosen.logprob if chosen else float("-inf")),
                                      bytes=list(token.encode("utf-8")),
                                      top_logprobs=[_top(self._text(t, lp), lp) for t, lp in top]))
        return result

    def _text(self, tid: int, lp: Optional[Logprob]) -> str:
        return token_string(self.engine, tid, lp, self.req.return_tokens_as_token_ids)


def _top(token: str, lp: Logprob) -> ChatLogProbTop:
    return ChatLogProbTop(token=token, logprob=json_logprob(lp.logprob), bytes=list(token.encode("utf-8")))


class _ChatChunks:
    """Stream rendering of DELTA outputs (serving.py; a beam search's one finished output is its
    own delta): a role chunk per choice, then content deltas; finish_reason on the last. The
    parsers (tools, reasoning, harmony) read each choice's whole text, kept in ``RequestSoFar``."""

    def __init__(self, view: _ChatView):
        self.view = view
        self.n = view.req.n or 1
        self.so_far = RequestSoFar()
        self.sent_ids = [0] * self.n  # return_token_ids: a held-back chunk's ids go with the next
        self.done = [False] * self.n
        plan = view.plan
        self.tools = [plan.view() if plan is not None else None for _ in range(self.n)]
        thinking = view.reasoning
        self.thinking = [ReasoningStream(thinking) if thinking is not None else None for _ in range(self.n)]
        harmony = view.harmony
        self.harmony = [HarmonyStream(harmony) if harmony is not None else None for _ in range(self.n)]

    @property
    def final(self) -> Optional[RequestOutput]:
        """The finished output, whole (its usage; /v1/responses), once the stream had it."""
        return self.so_far.output() if self.so_far.finished else None

    def _chunk(self, choices, usage_info=None, prompt_ids=None) -> ChatCompletionChunk:
        v = self.view
        return ChatCompletionChunk(id=v.id, created=v.created, model=v.model, choices=choices, usage=usage_info,
                                   prompt_token_ids=prompt_ids)

    def _usage_now(self, completion_tokens: int):
        options = self.view.req.stream_options
        return options.usage_now(self.view.prompt_tokens, completion_tokens) if options else None

    def start(self):
        prompt_ids = list(self.view.prompt_ids) if self.view.req.return_token_ids else None
        chunks = [self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role=self.view.role, content=""))],
                              self._usage_now(0), prompt_ids) for i in range(self.n)]
        if self.view.echo:  # vLLM's echo: the continued message's text, before the generated text
            chunks += [self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=self.view.echo))],
                                   self._usage_now(0)) for i in range(self.n)]
        return chunks

    def update(self, _index: int, out: RequestOutput):
        chunks = []
        self.so_far.add(out)
        for co in out.outputs:
            i = co.index
            if self.done[i]:
                continue
            whole = self.so_far.choice(i)
            text, new_ids, reason = co.text, co.token_ids, finish_reason(co.finish_reason)
            if not (text or reason or (new_ids and self.view.req.logprobs)):
                continue
            logprobs = None
            if self.view.req.logprobs:
                logprobs = ChatChoiceLogProbs(content=self.view.logprobs(new_ids, co.logprobs or []))
            self.done[i] = reason is not None
            delta = DeltaMessage(content=text) if text else DeltaMessage()
            if self.harmony[i] is not None:
                fields, content, pieces = self.harmony[i].delta(whole.text, reason is not None)
                delta = DeltaMessage(content=content or None, tool_calls=pieces or None, **fields)
                reason = self.view.tool_reason(self.harmony[i].view.num_calls > 0, reason)
                if not (delta.content or delta.reasoning or delta.tool_calls or reason or logprobs):
                    continue  # held back (a marker may be starting)
            elif self.thinking[i] is not None:
                delta, reason = self._reasoning_delta(i, whole, reason)
                if not (delta.content or delta.reasoning or delta.tool_calls or reason or logprobs):
                    continue  # held back (a marker may be starting), or reasoning not asked for
            elif self.tools[i] is not None:
                delta, reason = self._tool_delta(i, whole.text, reason, whole.token_ids)
                if not (delta.content or delta.tool_calls or reason or logprobs):
                    continue  # held back: it may be the start of a tool call
            ids = None
            if self.view.req.return_token_ids:
                ids, self.sent_ids[i] = whole.token_ids[self.sent_ids[i]:], len(whole.token_ids)
            chunks.append(self._chunk([ChatStreamChoice(index=i, delta=delta, logprobs=logprobs,
                                                        finish_reason=reason, token_ids=ids,
                                                        stop_reason=co.stop_reason if reason else None)],
                                      self._usage_now(len(whole.token_ids))))
        return chunks

    def _reasoning_delta(self, i: int, whole, reason: Optional[str]):
        final = reason is not None
        fields, answer = self.thinking[i].delta(whole.text, whole.token_ids, final)
        tools = self.tools[i]
        if tools is None:
            content, pieces = self.thinking[i].new_answer(answer), []
        else:
            content, pieces = tools.delta(answer, final)
            reason = self.view.tool_reason(tools.num_calls > 0, reason)
        return DeltaMessage(content=content or None, tool_calls=pieces or None, **fields), reason

    def _tool_delta(self, i: int, text: str, reason: Optional[str], token_ids=None):
        tools = self.tools[i]
        content, pieces = tools.delta(text, final=reason is not None, token_ids=token_ids)
        delta = DeltaMessage(content=content or None, tool_calls=pieces or None)
        return delta, self.view.tool_reason(tools.num_calls > 0, reason)

    def finish(self):
        req = self.view.req
        final = self.final
        if not (req.stream_options and req.stream_options.include_usage) or final is None:
            return []
        return [self._chunk([], usage([final], self.view.usage_details))]
