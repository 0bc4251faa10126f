"""Beam search above the engine, as vLLM does it: ``LLM.beam_search`` and ``use_beam_search``.

Each step every live beam is one engine request for a single token with the top ``2 *
beam_width`` logprobs; the prefix cache holds the beam's earlier tokens, so a step computes
only the tokens past the beam's last full KV block. Invariant after every step: ``beams``
holds at most ``beam_width`` unfinished sequences, the best by cumulative logprob among the
candidates, and ``completed`` every sequence that ended with EOS::

    beams   [p a] [p b]           step: each beam's top-2w tokens (and the sampled one)
    cands   [p a x] [p a EOS] [p b y] [p b z] ...
              |        '--> completed (EOS, unless ignore_eos)
              '--> the best w non-EOS candidates by cum_logprob are the next beams

A step request the engine failed (vLLM's finish reason "error", e.g. a custom logits processor
raised) ends its prompt's search: the result is one sequence, the prompt alone, with
finish_reason "error" and the engine's reason as stop_reason (vLLM's server beam search answers
the same: one output, no tokens, "error"); the other prompts' searches go on.

After ``max_tokens`` steps (or when no beam is left) the result is the best ``beam_width`` of
``completed`` + ``beams`` by ``cum_logprob / length ** length_penalty``, where length counts
the prompt and the generated tokens but not a final EOS (vLLM's score).

How this differs from HF transformers' ``generate(num_beams=...)`` (by design, as vLLM):
HF ranks all beams' continuations together and lets an EOS continuation finish only when it
ranks among the first ``num_beams``; here every EOS among a beam's top ``2 * beam_width``
tokens finishes. HF's length penalty divides by the generated length (EOS included), vLLM's
by prompt + generated (EOS excluded). HF stops early (``early_stopping``); this runs
``max_tokens`` steps. Without EOS (``ignore_eos``) both keep the same beams, so the sequences
equal HF's with ``length_penalty=0.0, early_stopping="never"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Generator, Optional, Union

from tessellm.core.outputs import Logprob
from tessellm.core.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``; invalid values raise ``ValueError``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0: each step also samples a token, which joins the candidates
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # keep the EOS token in a finished beam

    def __post_init__(self) -> None:
        if not (isinstance(self.beam_width, int) and self.beam_width >= 1):
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}.")


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's then the generated ones (vLLM's shape)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per generated token
    cum_logprob: float = 0.0
    text: Optional[str] = None  # filled when returned
    finish_reason: Optional[str] = None  # "stop" (EOS), "error" (the engine failed a step) or None
    stop_reason: Optional[Union[int, str]] = None  # the EOS id that ended it; "error": why


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    """One prompt's search; ``drive`` runs many together."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: Collection[int], max_model_len: int):
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        # each step's request holds the beam as its prompt and adds one token
        self.steps_left = min(params.max_tokens, max_model_len - self.prompt_len)
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.failed: Optional[BeamSearchSequence] = None  # the engine failed one of its steps
        self.cache_salt: Optional[str] = None  # the prompt's (vLLM's cache_salt), for every step
        self.priority = 0  # the request's (vLLM's priority), for every step

    def live(self) -> list[list[int]]:
        """The token lists to extend this step (none when done)."""
        return [b.tokens for b in self.beams] if self.steps_left > 0 else []

    def advance(self, entries: list[Union[None, dict[int, Logprob], "StepFailed"]]) -> None:
        """Each live beam's next-token logprobs (None: its request ended without them;
        ``StepFailed``: the engine failed it, which ends the search)."""
        failure = next((e for e in entries if isinstance(e, StepFailed)), None)
        if failure is not None:
            prompt = self.beams[0].tokens[:self.prompt_len]
            self.failed = BeamSearchSequence(prompt, finish_reason="error", stop_reason=failure.reason)
            self.beams, self.steps_left = [], 0
            return
        width, keep_eos = self.params.beam_width, self.params.include_stop_str_in_output
        candidates = []
        for beam, entry in zip(self.beams, entries):
            for token, lp in (entry or {}).items():
                cum = beam.cum_logprob + lp.logprob
                if token in self.eos:
                    self.completed.append(BeamSearchSequence(
                        beam.tokens + [token] if keep_eos else list(beam.tokens), beam.logprobs + [entry],
                        cum, finish_reason="stop", stop_reason=token))
                else:
                    candidates.append((cum, token, beam, entry))
        candidates.sort(key=lambda c: c[0], reverse=True)
        self.beams = [BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], cum)
                      for cum, token, beam, entry in candidates[:width]]
        self.steps_left = self.steps_left - 1 if self.beams else 0

    def score(self, seq: BeamSearchSequence) -> float:
        length = len(seq.tokens)
        if seq.finish_reason == "stop" and self.params.include_stop_str_in_output:
            length -= 1  # the EOS is not counted
        return seq.cum_logprob / (length ** self.params.length_penalty)

    def best(self) -> list[BeamSearchSequence]:
        """The best ``beam_width`` finished or surviving sequences, best first (a failed
        search: its one "error" sequence)."""
        if self.failed is not None:
            return [self.failed]
        ranked = sorted(self.completed + self.beams, key=self.score, reverse=True)
        return ranked[:self.params.beam_width]


def step_params(params: BeamSearchParams, vocab_size: int) -> SamplingParams:
    """The engine request of one beam for one step (vLLM's: 2 * beam_width logprobs)."""
    return SamplingParams(max_tokens=1, temperature=params.temperature,
                          logprobs=min(2 * params.beam_width, vocab_size))


Step = list[tuple[BeamSearch, list[int]]]


def drive(searches: list[BeamSearch]) -> Generator[Step, list, None]:
    """Runs the searches step by step: yields every live beam (its search and tokens: one
    engine request each) and takes back their next-token logprobs in that order; returns when
    all are done."""
    while True:
        batch = [(s, s.live()) for s in searches]
        batch = [(s, beams) for s, beams in batch if beams]
        if not batch:
            return
        entries = yield [(s, tokens) for s, beams in batch for tokens in beams]
        at = 0
        for search, beams in batch:
            search.advance(entries[at:at + len(beams)])
            at += len(beams)


@dataclass
class StepFailed:
    """A step request the engine failed (finish reason "error"); ``reason``: its stop_reason."""

    reason: Optional[str]


def step_logprobs(out) -> Union[None, dict[int, Logprob], StepFailed]:
    """A step request's RequestOutput -> its one token's logprobs (None if it has none;
    ``StepFailed`` if the engine failed it)."""
    if out.outputs and out.outputs[0].finish_reason == "error":
        return StepFailed(out.outputs[0].stop_reason)
    logprobs = out.outputs[0].logprobs if out.outputs else None
    return logprobs[0] if logprobs else None


def run_offline_limited(llm, prompts, params: BeamSearchParams, lora_request, priority: Optional[list[int]],
                        concurrency_limit: Optional[int]) -> list[BeamSearchOutput]:
    """``run_offline`` over at most ``concurrency_limit`` prompts at a time (vLLM's
    ``LLM.beam_search(concurrency_limit=...)``; None: all at once): the same results."""
    if concurrency_limit is None:
        return run_offline(llm, prompts, params, lora_request, priority)
    if not (isinstance(concurrency_limit, int) and not isinstance(concurrency_limit, bool)
            and concurrency_limit >= 1):
        raise ValueError(f"beam_search(concurrency_limit=...) must be an integer >= 1 or None, got "
                         f"{concurrency_limit!r}.")
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    out: list = []
    for at in range(0, len(prompts), concurrency_limit):
        part = slice(at, at + concurrency_limit)
        out += run_offline(llm, prompts[part], params, lora_request,
                           None if priority is None else list(priority)[part])
    return out


def run_offline(llm, prompts, params: BeamSearchParams, lora_request=None,
                priority: Optional[list[int]] = None) -> list[BeamSearchOutput]:
    """``LLM.beam_search``: every step one ``LLM.generate`` over all prompts' live beams, each
    at its prompt's ``priority`` (one per prompt; None: 0)."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if priority is not None and len(priority) != len(prompts):
        raise ValueError(f"beam_search(priority=...) has {len(priority)} values for {len(prompts)} "
                         "prompts; give one priority per prompt.")
    engine = llm.engine
    tokenizer, info = engine.tokenizer, engine.info
    processed = [engine.inputs.process_prompt(p) for p in prompts]
    if any(p.mm_features for p in processed):
        raise ValueError("beam_search does not take images (multi_modal_data); use generate.")
    if any(p.prompt_embeds is not None for p in processed):  # its token ids are placeholders
        raise ValueError("beam_search extends prompts by token ids; it does not take prompt_embeds. "
                         "Use generate.")
    searches = [BeamSearch(p.prompt_token_ids, params, info.eos_token_ids, info.max_model_len) for p in processed]
    for search, p, prio in zip(searches, processed, priority or [0] * len(processed)):
        search.cache_salt, search.priority = p.cache_salt, prio
    sampling = step_params(params, info.vocab_size)
    steps = drive(searches)
    try:
        batch = next(steps)
        while True:
            beams = [{"prompt_token_ids": t, **({"cache_salt": s.cache_salt} if s.cache_salt else {})}
                     for s, t in batch]
            outs = llm.generate(beams, sampling, use_tqdm=False, lora_request=lora_request,
                                priority=[s.priority for s, _ in batch] if priority is not None else None)
            batch = steps.send([step_logprobs(o) for o in outs])
    except StopIteration:
        pass
    results = []
    for search in searches:
        best = search.best()
        for seq in best:
            text = tokenizer.decode(seq.tokens) if tokenizer is not None else None
            seq.text = "" if seq.finish_reason == "error" else text
        results.append(BeamSearchOutput(best))
    return results

