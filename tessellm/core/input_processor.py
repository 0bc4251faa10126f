"""Front end, inbound: prompts to validated EngineCoreRequests (tokenize, check, fan out n)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from tessellm.core.engine_core import EngineCoreRequest, EngineInfo
from tessellm.core.prompt_truncation import PromptTruncator, cut_ids, side_for
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import check_prompt_fits
from tessellm.core.scheduler_config import RequestParamError, prompt_tokens_to_keep
from tessellm.kv_transfer.params import check_producer
from tessellm.reasoning.budget import REFUSAL, marker_ids

PromptType = Union[str, list[int], dict]


@dataclass
class ProcessedPrompt:
    prompt: Optional[str]
    prompt_token_ids: list[int]
    # Its images (tessellm.multimodal.inputs.MultiModalFeature), placeholders expanded in
    # prompt_token_ids; None for a text prompt.
    mm_features: Optional[list] = None
    # vLLM's cache_salt: mixed into its first prefix-cache block hash, so only requests with
    # the same salt share its cached blocks (isolates tenants). None: unsalted.
    cache_salt: Optional[str] = None
    # A prompt given as embeddings (tessellm.core.prompt_embeds.PromptEmbeds); its
    # prompt_token_ids are placeholders (0), one per row. None: a token prompt.
    prompt_embeds: Optional[object] = None


class InputProcessor:
    def __init__(self, info: EngineInfo, tokenizer):
        self.info = info
        self.tokenizer = tokenizer
        # vLLM's cut: a pooling model keeps a prompt's first tokens, a generating one its last
        # (prompt_truncation.py)
        self.truncator = PromptTruncator(side_for(getattr(info, "runner", "generate")))
        if info.mm_limits:  # a vision model: its processor's chat template where the tokenizer has none
            from tessellm.multimodal.processor import adopt_chat_template

            adopt_chat_template(tokenizer, info)
        self._valid_specs: dict[str, None] = {}  # cache keys of structured outputs that parsed
        self._thinking_ids: Optional[dict] = None  # the reasoning markers' ids (a thinking budget's)
        # Set when the engine cannot constrain to this tokenizer's vocabulary (set_tokenizer on a
        # data-parallel engine): every constrained request is refused with it.
        self.structured_refusal: Optional[str] = None
        # True while the cores load a tokenizer set_tokenizer gave (AsyncLLM): constrained
        # requests are refused for a moment (TokenizerLoadingError).
        self.structured_loading = False

    def process_prompt(self, prompt: PromptType, truncate: Optional[int] = None) -> ProcessedPrompt:
        """A str, token ids, or a dict (vLLM's TextPrompt / TokensPrompt: ``prompt`` or
        ``prompt_token_ids``, optional ``multi_modal_data`` and ``cache_salt``). ``truncate``:
        keep only ``truncate`` tokens (-1: as many as the context holds), before the length
        check: the last ones on a generating engine, the first ones on a pooling engine, a text
        prompt cut by its tokenizer (special tokens kept), as vLLM (``prompt_truncation.py``)."""
        processed = self._process(prompt, truncate)
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            processed.cache_salt = check_cache_salt(prompt["cache_salt"])
        return processed

    def _process(self, prompt: PromptType, truncate: Optional[int]) -> ProcessedPrompt:
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            return self._process_embeds(prompt, truncate)
        if isinstance(prompt, dict) and "multi_modal_data" in prompt:
            from tessellm.multimodal.processor import has_images

            if has_images(prompt["multi_modal_data"]):
                if truncate is not None:
                    raise ValueError("truncate_prompt_tokens does not combine with images (it could "
                                     "cut an image's placeholders); send a shorter prompt.")
                return self._check(self._process_multimodal(prompt))
            prompt = {k: v for k, v in prompt.items() if k != "multi_modal_data"}  # no image: text
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return self._check(ProcessedPrompt(prompt.get("prompt"), list(prompt["prompt_token_ids"])),
                                   truncate)
            prompt = prompt.get("prompt")
        if isinstance(prompt, list):
            return self._check(ProcessedPrompt(None, list(prompt)), truncate)
        if not isinstance(prompt, str):
            raise ValueError(f"A prompt must be a string, a list of token ids or a dict with "
                             f"'prompt' or 'prompt_token_ids', got {type(prompt).__name__}.")
        if not prompt:
            raise ValueError("The prompt is empty; give at least one character.")
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer files; pass prompts as token ids "
                             "({'prompt_token_ids': [...]}).")
        return self._check(ProcessedPrompt(prompt, self.encode_text(prompt, truncate)), truncate)

    @property
    def room(self) -> int:
        """Positions a prompt must leave free: one for a generated token, none for pooling."""
        return 0 if getattr(self.info, "runner", "") == "pooling" else 1

    def encode_text(self, text: str, truncate: Optional[int] = None, add_special_tokens: bool = True) -> list[int]:
        """``text`` as token ids, cut to ``truncate_prompt_tokens`` as vLLM cuts a text prompt
        (the tokenizer's truncation on this runner's side; -1: as many as the context holds)."""
        keep = prompt_tokens_to_keep(truncate, self.info.max_model_len, self.room)
        return self.truncator.encode(self.tokenizer, text, keep, add_special_tokens)

    def _process_embeds(self, prompt: dict, truncate: Optional[int]) -> ProcessedPrompt:
        """``{"prompt_embeds": tensor[tokens, hidden]}`` (vLLM's EmbedsPrompt)."""
        from tessellm.core.prompt_embeds import PromptEmbeds

        hidden = getattr(self.info, "prompt_embeds_hidden_size", 0)
        if not hidden:
            raise ValueError("prompt_embeds needs an engine started with enable_prompt_embeds=True "
                             "(--enable-prompt-embeds).")
        extra = sorted(set(prompt) - {"prompt_embeds", "cache_salt"})
        if extra:
            raise ValueError(f"A prompt_embeds prompt takes no {', '.join(map(repr, extra))}; give "
                             "the embeddings alone (or a token / text prompt instead).")
        if truncate is not None:
            raise ValueError("truncate_prompt_tokens does not apply to prompt_embeds; send fewer rows.")
        embeds = PromptEmbeds.from_tensor(prompt["prompt_embeds"], hidden, self.info.dtype)
        return self._check(ProcessedPrompt(None, [0] * embeds.num_tokens, prompt_embeds=embeds))

    def _process_multimodal(self, prompt: dict) -> ProcessedPrompt:
        """``{"prompt" | "prompt_token_ids", "multi_modal_data": {"image": ..., "video": ...},
        "mm_processor_kwargs": {...}}`` or ``{..., "multi_modal_data": {"audio": ...}}`` (vLLM's
        forms; the kwargs: ``ImageProcessor.check_mm_kwargs``)."""
        from tessellm.multimodal.processor import get_processor, given

        data = prompt["multi_modal_data"]
        processor = get_processor(self.info)
        text = prompt.get("prompt")
        source = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else text
        if not source:
            raise ValueError("The prompt is empty; give 'prompt' text (with <image>, or the model's "
                             "placeholder such as <|AUDIO|>, where each item goes) or 'prompt_token_ids'.")
        # vLLM's per-request processor settings (a family that reads none refuses them by name)
        mm = processor.check_mm_kwargs(self._mm_kwargs(prompt))
        if getattr(processor, "modality", "image") == "audio":  # Qwen2-Audio
            processor.check_count(int(given(data.get("image"))) + int(given(data.get("video"))))
            audio = data.get("audio")
            ids, features = processor.process(source, audio if given(audio) else [])
            return ProcessedPrompt(text, ids, features or None)
        if given(data.get("audio")):
            processor.check_audio_count(1)  # an image model: refused by name
        videos = data.get("video")
        kwargs = {"mm_kwargs": mm} if mm else {}
        if given(videos):
            processor.check_video_count(1)  # a model without videos: refused by name
            ids, features = processor.process(source, data.get("image", []), videos, **kwargs)
        else:
            ids, features = processor.process(source, data.get("image", []), **kwargs)
        return ProcessedPrompt(text, ids, features or None)

    def _mm_kwargs(self, prompt: dict):
        """The request's ``mm_processor_kwargs`` laid over the engine's (``--mm-processor-kwargs``),
        as vLLM merges them; a value that is not a dict is passed on to be refused."""
        given = prompt.get("mm_processor_kwargs")
        default = getattr(self.info, "mm_processor_kwargs", None) or {}
        if given is None or not default:
            return given if given is not None else (dict(default) or None)
        return {**default, **given} if isinstance(given, dict) else given

    def _check(self, p: ProcessedPrompt, truncate: Optional[int] = None) -> ProcessedPrompt:
        room = self.room  # pooling: may fill the context
        keep = prompt_tokens_to_keep(truncate, self.info.max_model_len, room)
        p.prompt_token_ids = cut_ids(p.prompt_token_ids, keep, self.truncator.side)
        ids = p.prompt_token_ids
        if not ids:
            raise ValueError("The prompt is empty; give at least one token.")
        if self.info.mm_limits and not p.mm_features:
            from tessellm.multimodal.processor import get_processor

            get_processor(self.info).check_without_images(ids)
        if not all(isinstance(t, int) and 0 <= t < self.info.vocab_size for t in ids):
            raise ValueError(f"Prompt token ids must be integers in [0, {self.info.vocab_size}).")
        check_prompt_fits(len(ids), self.info.max_model_len,
                          self.info.num_kv_blocks * self.info.block_size, room)
        return p

    def _check_structured(self, structured) -> None:
        """Refuse a malformed schema / grammar / regex here, before anything is queued (the
        core compiles it later, off its step loop). Recently accepted specs are remembered."""
        if self.structured_loading:
            from tessellm.core.core_tokenizer import LOADING_REFUSAL, TokenizerLoadingError

            raise TokenizerLoadingError(LOADING_REFUSAL, "structured_outputs")
        if self.structured_refusal is not None:
            raise RequestParamError(self.structured_refusal, "structured_outputs")
        key = structured.cache_key()
        if key in self._valid_specs:
            return
        from tessellm.structured_output.grammar import build_grammar

        build_grammar(structured)
        self._valid_specs[key] = None
        if len(self._valid_specs) > 256:
            self._valid_specs.pop(next(iter(self._valid_specs)))

    def _whole_vocab_logprobs(self, params: SamplingParams) -> SamplingParams:
        """vLLM's ``logprobs=-1`` / ``prompt_logprobs=-1``: every token of the vocabulary, a
        count the core then treats as any other top k."""
        changes = {name: self.info.vocab_size for name in ("logprobs", "prompt_logprobs")
                   if getattr(params, name) == -1}
        return params.clone(**changes) if changes else params

    def _check_vocab(self, params: SamplingParams) -> None:
        """What only the model can judge: token ids and logprob counts against its vocabulary
        (refused here: inside a step they would fail the whole batch), stop strings without a
        tokenizer (they would be ignored)."""
        vocab = self.info.vocab_size
        if params.stop and self.tokenizer is None:
            raise RequestParamError("stop strings need the model's tokenizer, and this model has "
                                    "no tokenizer files; use stop_token_ids instead.", "stop")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > vocab:
                raise RequestParamError(f"{field} is {value}, over the vocabulary size {vocab}; ask "
                                        f"for at most {vocab} top logprobs per token.", field)
        for token in params.logit_bias or ():
            if not (isinstance(token, int) and 0 <= token < vocab):
                raise RequestParamError(f"logit_bias token id {token} is outside the vocabulary "
                                        f"[0, {vocab}); use this model's token ids.", "logit_bias")
        for field in ("allowed_token_ids", "bad_words_token_ids", "logprob_token_ids",
                      "prompt_logprob_token_ids"):
            value = getattr(params, field) or ()
            if field == "bad_words_token_ids" or (field == "prompt_logprob_token_ids"
                                                  and params.prompt_ids_per_row):
                tokens = [t for row in value for t in row if field == "bad_words_token_ids" or t != -1]
            else:
                tokens = value
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise RequestParamError(f"{field} has {bad[0]}, outside the vocabulary [0, {vocab}); "
                                        f"use this model's token ids.", field)
        self._check_allowed_left(params)
        for token in params.stop_token_ids or ():
            if not (isinstance(token, int) and 0 <= token < vocab):
                raise RequestParamError(f"stop_token_ids has {token}, outside the vocabulary "
                                        f"[0, {vocab}); use this model's token ids.",
                                        "stop_token_ids")

    def _bad_words_token_ids(self, params: SamplingParams) -> list[list[int]]:
        """``bad_words`` as token sequences (plus any given ``bad_words_token_ids``): each word
        without a leading space (as at the start of the text) and with one (after another
        word), the second kept when it tokenizes differently. vLLM keeps it only when it also
        has as many tokens; every distinct form is kept here, so a word whose spaced form
        splits differently is banned too."""
        if self.tokenizer is None:
            raise RequestParamError("bad_words need the model's tokenizer, and this model has no "
                                    "tokenizer files; pass bad_words_token_ids instead.", "bad_words")
        words = [list(w) for w in params.bad_words_token_ids or ()]
        for word in params.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if not ids:
                    raise RequestParamError(f"bad_words entry {word!r} tokenizes to no tokens; "
                                            "remove it.", "bad_words")
                if ids not in words:
                    words.append(ids)
        return words

    def _thinking_marker_ids(self) -> dict:
        """``thinking_start_ids`` / ``thinking_end_ids`` for a request with a thinking budget:
        the engine's markers (its reasoning parser's or --reasoning-config's) tokenized once."""
        if self._thinking_ids is None:
            markers = getattr(self.info, "thinking_markers", None)
            if not markers:
                raise RequestParamError(REFUSAL, "thinking_token_budget")
            if self.tokenizer is None:
                raise RequestParamError("thinking_token_budget needs the model's tokenizer to find the "
                                        "reasoning markers, and this model has no tokenizer files; drop "
                                        "thinking_token_budget.", "thinking_token_budget")
            starts, ends = markers
            self._thinking_ids = {"thinking_start_ids": marker_ids(self.tokenizer, starts),
                                  "thinking_end_ids": marker_ids(self.tokenizer, ends)}
        return self._thinking_ids

    def _check_allowed_left(self, params: SamplingParams) -> None:
        """Refuse allowed_token_ids that other bans empty from the start (the sampler would
        have nothing to sample; it then takes token 0, sampler._point_rows)."""
        if not params.allowed_token_ids:
            return
        allowed = set(params.allowed_token_ids)
        if allowed <= {w[0] for w in params.bad_words_token_ids or () if len(w) == 1}:
            raise RequestParamError("Every token in allowed_token_ids is also a one-token bad word, so "
                                    "nothing could be generated; allow another token or drop that bad "
                                    "word.", "allowed_token_ids")
        if params.min_tokens and allowed <= set(params.stop_token_ids) | set(self.info.eos_token_ids):
            raise RequestParamError("Every token in allowed_token_ids is an EOS or stop token, which "
                                    "min_tokens bans, so nothing could be generated; allow another "
                                    "token or drop min_tokens.", "allowed_token_ids")

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      arrival_time: Optional[float] = None,
                      lora_request=None, priority: int = 0) -> list[EngineCoreRequest]:
        """One core request per sample; samples after the first reuse its prompt blocks.
        ``lora_request``: the adapter (``tessellm.lora.LoRARequest``), None for the base model;
        ``priority``: vLLM's (``check_priority``)."""
        check_priority(priority, self.info.scheduling_policy)
        try:  # a KV producer this engine does not fetch from (docs/kv_transfer.md)
            check_producer(getattr(params, "kv_transfer_params", None), self.info.kv_producers)
        except ValueError as exc:
            raise RequestParamError(str(exc), "kv_transfer_params") from None
        lora = None if lora_request is None else lora_request.to_dict()
        arrival = time.time() if arrival_time is None else arrival_time
        if params.bad_words:
            params = params.clone(bad_words_token_ids=self._bad_words_token_ids(params))
        if params.thinking_token_budget is not None:
            params = params.clone(**self._thinking_marker_ids())
        params = self._whole_vocab_logprobs(params)
        self._check_vocab(params)
        if params.structured_outputs is not None:
            self._check_structured(params.structured_outputs)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.info.max_model_len - len(prompt.prompt_token_ids))
        mm, salt, embeds = prompt.mm_features, prompt.cache_salt, prompt.prompt_embeds
        if embeds is not None and params.prompt_logprobs is not None:
            raise RequestParamError("prompt_logprobs need prompt tokens; a prompt_embeds prompt has "
                                    "none. Drop prompt_logprobs.", "prompt_logprobs")
        if embeds is not None and params.prompt_logprob_token_ids is not None:
            raise RequestParamError("prompt_logprob_token_ids score prompt tokens; a prompt_embeds "
                                    "prompt has none. Drop prompt_logprob_token_ids.",
                                    "prompt_logprob_token_ids")
        if params.prompt_ids_per_row:
            _check_scored_rows(params, len(prompt.prompt_token_ids))
        if params.n == 1:
            return [EngineCoreRequest(request_id, prompt.prompt_token_ids, params, arrival,
                                      cache_salt=salt, lora_request=lora, mm_features=mm,
                                      prompt_embeds=embeds, priority=priority)]
        child_ids = [child_request_id(request_id, i) for i in range(params.n)]
        reqs = []
        for i, cid in enumerate(child_ids):
            child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            reqs.append(EngineCoreRequest(cid, prompt.prompt_token_ids, child_params, arrival,
                                          cache_salt=salt, wait_for=child_ids[0] if i else None,
                                          lora_request=lora, mm_features=mm, prompt_embeds=embeds,
                                          priority=priority))
        return reqs


_INT64 = 2**63


def check_priority(priority, policy: str) -> None:
    """vLLM's request priority: an integer (lower is served first), non-zero only on an engine
    started with scheduling_policy "priority"; else RequestParamError naming it."""
    if not isinstance(priority, int) or isinstance(priority, bool) or not -_INT64 <= priority < _INT64:
        raise RequestParamError(f"priority must be an integer (lower is served first), got {priority!r}.",
                                "priority")
    if priority and policy != "priority":
        raise RequestParamError(f"priority is {priority}, but this engine serves requests first come, "
                                "first served; start it with scheduling_policy='priority' "
                                "(--scheduling-policy priority), or leave priority at 0.", "priority")


def check_cache_salt(salt) -> str:
    """A request's cache_salt, refused (as vLLM) unless a non-empty string."""
    if not isinstance(salt, str) or not salt:
        raise RequestParamError("cache_salt must be a non-empty string when given (a random, "
                                "unguessable one per tenant).", "cache_salt")
    return salt


def child_request_id(parent_id: str, index: int) -> str:
    return f"{index}_{parent_id}"


def random_request_id() -> str:
    return uuid.uuid4().hex


def _check_scored_rows(params, prompt_len: int) -> None:
    """Per-row ``prompt_logprob_token_ids`` need one row per scored prompt row (vLLM PR
    #56984): rows ``prompt_logprob_start`` to ``prompt_len - 2``."""
    start = params.prompt_logprob_start or 0
    want = max(0, prompt_len - 1 - start)
    got = len(params.prompt_logprob_token_ids)
    if got != want:
        raise RequestParamError(
            f"prompt_logprob_token_ids has {got} rows, but a {prompt_len}-token prompt scored from "
            f"prompt_logprob_start={start} has {want} (len(prompt) - 1 - prompt_logprob_start); give "
            "one id list per scored row.", "prompt_logprob_token_ids")
