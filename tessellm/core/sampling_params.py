"""Sampling parameters, with vLLM's field names and meanings."""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from tessellm.core.repetition import RepetitionDetectionParams
from tessellm.core.scheduler_config import check_truncate_prompt_tokens
from tessellm.kv_transfer.params import check_kv_transfer_params
from tessellm.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 0.01  # vLLM's: a temperature in (0, 0.01) is raised to it (inf / NaN in the softmax)
_MAX_TEMPERATURE = 2.0  # vLLM's (and OpenAI's) upper bound
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on len(logprob_token_ids)

logger = logging.getLogger(__name__)


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what each ``RequestOutput`` of a request holds while it runs (``LLMEngine.step``,
    ``AsyncLLM``). ``LLM.generate`` returns finished outputs only, whatever the kind."""

    CUMULATIVE = 0  # everything generated so far
    DELTA = 1  # only what is new since the request's previous output
    FINAL_ONLY = 2  # no output until the request finishes


@dataclass
class SamplingParams:
    """How to sample one request's output. Invalid values raise ``ValueError`` at construction."""

    n: int = 1  # number of output sequences sampled from the prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 disables
    min_p: float = 0.0  # drop tokens below min_p * the most likely token's probability
    seed: Optional[int] = None  # per-request generator: same seed, same tokens, any batch
    max_tokens: Optional[int] = 16  # None: up to the context length
    min_tokens: int = 0  # EOS, stop tokens and stop strings end nothing until this many are generated
    stop: Optional[Union[str, list[str]]] = None  # strings that end generation (not in output)
    stop_token_ids: Optional[list[int]] = None  # token ids that end generation (kept in ids)
    ignore_eos: bool = False  # keep generating past EOS
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once per token seen in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; divides positive logits of prompt+output tokens
    # top-k logprobs per output token (plus the sampled one); -1: the whole vocabulary (vLLM's)
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None  # top-k logprobs per prompt token; -1 as above
    skip_special_tokens: bool = True  # in the detokenized text
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit
    # Only these token ids may be sampled (the others' logits are -inf before temperature,
    # top-k/p); logprobs stay those of the raw logits, as vLLM's. None: no restriction.
    allowed_token_ids: Optional[list[int]] = None
    # Words that must not be generated: the front end tokenizes each (with and without a
    # leading space) into ``bad_words_token_ids``; a word's last token is banned whenever the
    # output so far ends with the word's other tokens (vLLM's rule).
    bad_words: Optional[list[str]] = None
    # Token sequences banned as above; filled from ``bad_words`` by the front end
    # (InputProcessor), or given directly (a model without a tokenizer).
    bad_words_token_ids: Optional[list[list[int]]] = None
    # Constrain the output to a JSON schema, regex, choice, grammar (structured_output/params.py);
    # a dict (as msgpack carries it) is converted.
    structured_outputs: Optional[StructuredOutputsParams] = None
    # vLLM's per-request KV connector parameters (the OpenAI request's ``kv_transfer_params``;
    # docs/kv_transfer.md): ``{"do_remote_decode": true}`` makes a producer's output wait for
    # the request's saves; the other keys a vLLM proxy sends are accepted and not needed.
    kv_transfer_params: Optional[dict] = None
    # vLLM's: keep only the prompt's last N tokens (-1: max_model_len - 1 of them, room for one
    # token, whatever max_tokens; the server's rule too: prompt_tokens_to_keep); LLM.generate /
    # LLMEngine.add_request cut the prompt before the length check
    truncate_prompt_tokens: Optional[int] = None
    # vLLM's names tessellm takes at the value that changes nothing (_VLLM_NEUTRAL), or translates
    best_of: Optional[int] = None  # only None or n (no ranking of samples)
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Optional[list] = None
    guided_decoding: Optional[object] = None  # vLLM's older name: moved to structured_outputs
    # vLLM's: the logprobs of exactly these token ids at every output position, with the
    # sampled token's (in place of the top-k; at most MAX_LOGPROB_TOKEN_IDS; logprobs, if set,
    # must equal their number). Each position's dict: the sampled token with its rank in the
    # vocabulary, then these ids with rank = their place in this list (1-based), as vLLM's.
    logprob_token_ids: Optional[list[int]] = None
    # vLLM's prefill scoring: the logprobs of these token ids at every prompt row from
    # prompt_logprob_start (row i predicts prompt token i + 1; 0 if None) to the row before the
    # last; in RequestOutput.prompt_token_id_logprobs, float32 [rows, len(ids)] (no leading None).
    # Per row (vLLM PR #56984): a list of id lists (or a 2-D integer array), one per scored row,
    # exactly len(prompt) - 1 - prompt_logprob_start of them; shorter rows are padded with -1
    # here, and a padded column scores -inf.
    prompt_logprob_token_ids: Optional[Union[list[int], list[list[int]]]] = None
    prompt_logprob_start: Optional[int] = None
    # vLLM's names for features tessellm does not have: only at the value that changes nothing
    # (_VLLM_NEUTRAL), so a script that sets them is refused by name, never silently changed
    flat_logprobs: bool = False
    # vLLM's: stop the request (finish reason "repetition") when its output ends with min_count
    # copies of one pattern (core/repetition.py); a RepetitionDetectionParams or a dict of its
    # fields (converted), None or all 0: off
    repetition_detection: Optional[RepetitionDetectionParams] = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: Optional[list] = None
    # vLLM's, accepted with no effect on the output: outputs stream every step whatever
    # stream_interval asks (the text is the same, in more pieces); skip_clone is vLLM's internal
    # copy-avoidance; prompt logprobs are exact with prefix caching on, so
    # skip_reading_prefix_cache changes nothing
    stream_interval: Optional[int] = None
    skip_clone: bool = False
    skip_reading_prefix_cache: Optional[bool] = None
    # vLLM's: free-form values for custom extensions (the OpenAI request's vllm_xargs), carried
    # to the engine core with the request (Request.sampling_params.extra_args); read by custom
    # logits processors (docs/logits_processors.md), nothing else of tessellm's
    extra_args: Optional[dict] = None
    # Set by the server's reasoning parser (tessellm/reasoning/): where the output starts,
    # "reasoning", "answer" or "undecided", as it read the prompt and the request's
    # chat_template_kwargs; the engine core's grammar gate starts there. None: the engine core
    # reads it off the prompt itself (offline LLM.generate).
    reasoning_phase: Optional[str] = None
    # vLLM's: at most this many tokens of thinking (counted after the reasoning start marker,
    # in the prompt too), then the end marker is forced and the model answers
    # (tessellm/reasoning/budget.py, docs/reasoning.md); 0 forces it at once; None or -1: no cap.
    thinking_token_budget: Optional[int] = None
    # The markers' token ids, filled by the front end (InputProcessor) from the engine's
    # reasoning parser or --reasoning-config when a budget is set: each spelling of the start,
    # and of the end (the first is the one forced; the others, such as Qwen3's <tool_call>,
    # also end the thinking).
    thinking_start_ids: Optional[list[list[int]]] = None
    thinking_end_ids: Optional[list[list[int]]] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # an int after msgpack: converted
    extra: dict = field(default_factory=dict, repr=False)  # free-form, ignored by the engine

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:  # vLLM's: -1 is no seed (a new random draw each time), as UIs send it
            self.seed = None
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s, which may give NaN or inf logits; raised to %s "
                           "(as vLLM does). Use 0 for greedy sampling.", self.temperature,
                           _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE
        for name in ("logprobs", "prompt_logprobs"):  # vLLM's: True is 1
            if getattr(self, name) is True:
                setattr(self, name, 1)
        if self.thinking_token_budget == -1:  # vLLM's: unlimited
            self.thinking_token_budget = None
        # an int (msgpack's form of it) is taken; a bool or float is not (True == DELTA otherwise)
        _check(isinstance(self.output_kind, int) and not isinstance(self.output_kind, bool)
               and self.output_kind in tuple(RequestOutputKind), "output_kind must be a RequestOutputKind "
               f"(tessellm.sampling_params: CUMULATIVE, DELTA or FINAL_ONLY), got {self.output_kind!r}.")
        self.output_kind = RequestOutputKind(self.output_kind)
        _check(self.reasoning_phase in (None, "reasoning", "answer", "undecided"),
               f"reasoning_phase must be reasoning, answer or undecided, got {self.reasoning_phase!r}.")
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        self.repetition_detection = RepetitionDetectionParams.coerce(self.repetition_detection)
        if self.guided_decoding is not None:  # vLLM's older name (GuidedDecodingParams)
            _check(self.structured_outputs is None, "give structured_outputs or guided_decoding "
                   "(vLLM's older name for it), not both.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs must be a StructuredOutputsParams (or a dict of its fields).")
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}.")
        _check(0 <= self.temperature <= _MAX_TEMPERATURE,
               f"temperature must be in [0, {_MAX_TEMPERATURE:g}] (vLLM's bound), got {self.temperature}.")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}.")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}.")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}.")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).")
        _check(-2 <= self.presence_penalty <= 2,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        _check(-2 <= self.frequency_penalty <= 2,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        _check(self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= -1),
                   f"{name} must be None, an integer >= 0 or -1 (the whole vocabulary), got {value!r}.")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}.")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a string or a list of non-empty strings.")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be a list of non-negative integers.")
        if self.logit_bias is not None:
            _check(all(isinstance(k, int) for k in self.logit_bias), "logit_bias keys must be token ids (int).")
            for token, value in self.logit_bias.items():
                _check(isinstance(value, (int, float)) and not math.isnan(value) and value != math.inf,
                       f"logit_bias value for token {token} must be a number below +inf (-inf bans the "
                       f"token), got {value!r}.")

        check_truncate_prompt_tokens(self.truncate_prompt_tokens)  # the server's check too
        _check(self.stream_interval is None or (isinstance(self.stream_interval, int) and self.stream_interval >= 1),
               f"stream_interval must be an integer >= 1, got {self.stream_interval!r}.")
        _check(self.best_of in (None, self.n), f"best_of ({self.best_of}) other than n ({self.n}) is "
               "not supported by tessellm (no ranking of samples); leave it unset.")
        for name, neutral, fix in _VLLM_NEUTRAL:
            _check(getattr(self, name) in neutral, f"{name}={getattr(self, name)!r} is not supported by "
                   f"tessellm (a vLLM setting): {fix}.")
        self._validate_token_lists()
        self._validate_logprob_token_ids()

    def _validate_logprob_token_ids(self) -> None:
        """vLLM's rules (``_validate_logprobs``); the vocabulary bound is the engine's
        (InputProcessor), the server's --max-logprobs bound the server's."""
        ids = self.logprob_token_ids
        if ids is not None:
            _check(isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in ids),
                   f"logprob_token_ids must be a list of token ids (integers), got {ids!r}.")
            _check(len(ids) <= MAX_LOGPROB_TOKEN_IDS, f"logprob_token_ids has {len(ids)} ids, over the "
                   f"limit of {MAX_LOGPROB_TOKEN_IDS} (vLLM's); ask for fewer.")
            _check(self.logprobs is None or self.logprobs == len(ids), "when both logprobs and "
                   f"logprob_token_ids are set, logprobs must equal len(logprob_token_ids); got "
                   f"logprobs={self.logprobs}, len(logprob_token_ids)={len(ids)}. Leave logprobs unset.")
            self.logprob_token_ids = list(ids) or None  # [] asks nothing (vLLM's num_logprobs)
        ids = self.prompt_logprob_token_ids
        if ids is not None:
            ids = ids.tolist() if hasattr(ids, "tolist") else ids  # a numpy array / tensor
            _check(isinstance(ids, (list, tuple)) and len(ids) > 0, "prompt_logprob_token_ids must "
                   "not be empty; give the ids to score (one list, or one list per row) or leave it unset.")
            if all(isinstance(row, (list, tuple)) for row in ids):
                self.prompt_logprob_token_ids = _per_row_ids(ids)
            else:
                _check(all(_is_int(t) for t in ids), "prompt_logprob_token_ids must be a list of token "
                       f"ids (integers), or a list of such lists (one per scored row), got {ids!r}.")
                _check(len(set(ids)) == len(ids), "prompt_logprob_token_ids must not contain duplicates.")
                self.prompt_logprob_token_ids = list(ids)
        start = self.prompt_logprob_start
        _check(start is None or (isinstance(start, int) and not isinstance(start, bool) and 0 <= start < 2 ** 63),
               f"prompt_logprob_start must be a non-negative integer (below 2**63), got {start!r}.")

    def _validate_token_lists(self) -> None:
        if self.allowed_token_ids is not None:
            _check(isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0,
                   "allowed_token_ids is empty: give at least one token id, or null for no restriction.")
            _check(all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids),
                   f"allowed_token_ids must be non-negative integers, got {self.allowed_token_ids!r}.")
        _check(self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words),
               "bad_words must be a list of non-empty strings.")
        if self.bad_words_token_ids is not None:
            _check(all(isinstance(w, (list, tuple)) and w and all(isinstance(t, int) and t >= 0 for t in w)
                       for w in self.bad_words_token_ids),
                   "bad_words_token_ids must be a list of non-empty lists of non-negative token ids.")
        _check(self.kv_transfer_params is None or isinstance(self.kv_transfer_params, dict),
               "kv_transfer_params must be a JSON object (e.g. {\"do_remote_decode\": true}) or "
               f"null, got {type(self.kv_transfer_params).__name__}.")
        if self.kv_transfer_params is not None:
            check_kv_transfer_params(self.kv_transfer_params)  # a malformed key: named
        budget = self.thinking_token_budget
        _check(budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and 0 <= budget < 2 ** 63),
               f"thinking_token_budget must be an integer >= 0 (below 2**63), or -1 / null for no cap, got "
               f"{budget!r}.")
        for name in ("thinking_start_ids", "thinking_end_ids"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, (list, tuple)) and value and all(
                       isinstance(m, (list, tuple)) and m and all(isinstance(t, int) and t >= 0 for t in m)
                       for m in value)),
                   f"{name} must be a list of non-empty lists of token ids (the front end fills it).")

    @classmethod
    def from_optional(cls, **kwargs) -> "SamplingParams":
        """vLLM's: the fields given as None take their defaults (e.g. straight from a request);
        ``logit_bias`` keys may be strings of token ids, its values are clamped to [-100, 100]."""
        bias = kwargs.get("logit_bias")
        if bias:
            try:
                keys = [int(k) for k in bias]
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys must be token ids, got {list(bias)!r}.") from None
            # a value that is no number, or NaN, is left as given: __post_init__ refuses it by token
            kwargs["logit_bias"] = {k: _clamp_bias(v) for k, v in zip(keys, bias.values())}
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    @property
    def num_logprobs(self) -> Optional[int]:
        """vLLM's: the sample logprobs asked per output token (None: none); ``logprob_token_ids``
        alone asks for their number."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    @property
    def prompt_ids_per_row(self) -> bool:
        """``prompt_logprob_token_ids`` holds one id list per scored row (vLLM PR #56984)."""
        ids = self.prompt_logprob_token_ids
        return bool(ids) and isinstance(ids[0], list)

    @property
    def needs_prompt_rows(self) -> bool:
        """The runner computes logits at prompt rows (prompt logprobs or prefill scoring)."""
        return self.prompt_logprobs is not None or self.prompt_logprob_token_ids is not None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """The sampler reads this request's output so far (penalties, bad words, a thinking
        budget): the runner resolves steps in flight first."""
        return self.needs_penalties or bool(self.bad_words_token_ids) or self.thinking_token_budget is not None

    def clone(self, **changes) -> "SamplingParams":
        from dataclasses import replace

        return replace(self, **changes)


# vLLM's fields accepted only at the value that changes nothing: (name, neutral values, the fix)
def _clamp_bias(value):
    """A logit_bias value clamped to [-100, 100] as vLLM's ``from_optional`` does."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return value
    return min(100.0, max(-100.0, value))


_VLLM_NEUTRAL = (
    ("detokenize", (True,), "the text is always produced; read the output's token_ids"),
    ("spaces_between_special_tokens", (True,), "special tokens are decoded as the tokenizer "
     "joins them; use skip_special_tokens"),
    ("logits_processors", (None, []), "per-request callables are not supported (nor in vLLM v1); "
     "give batch-level processors to the engine, LLM(logits_processors=[Cls]), and select them per "
     "request with extra_args (docs/logits_processors.md)"),
    ("flat_logprobs", (False,), "logprobs come as vLLM's default list of dicts"),
    ("routed_experts_prompt_start", (0,), "tessellm does not return routed experts"),
    ("trace_decode_token_ids", (None, []), "score a fixed continuation with prompt_logprobs on "
     "prompt + continuation"),
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_row_ids(rows) -> list[list[int]]:
    """``prompt_logprob_token_ids`` per row (vLLM PR #56984), checked and padded with -1 to
    the longest row: each row distinct ids, -1 only after them (the padding of a 2-D array)."""
    width = max(len(row) for row in rows)
    _check(width > 0, "prompt_logprob_token_ids has no id in any row; give the ids to score or "
           "leave it unset.")
    out = []
    for j, row in enumerate(rows):
        _check(all(_is_int(t) and t >= -1 for t in row), "prompt_logprob_token_ids row "
               f"{j} must be a list of token ids (integers, -1 for padding), got {list(row)!r}.")
        ids = [t for t in row if t != -1]
        _check(list(row[:len(ids)]) == ids, f"prompt_logprob_token_ids row {j} has -1 (padding) "
               "before an id; put the padding after the row's ids.")
        _check(len(set(ids)) == len(ids), f"prompt_logprob_token_ids row {j} has duplicate ids.")
        out.append(ids + [-1] * (width - len(ids)))
    return out
