"""``SpeculativeConfig``: which proposer drafts tokens, how many, and when speculation is off.

Field names follow vLLM's ``--speculative-config`` where vLLM has them (``method``,
``num_speculative_tokens``, ``prompt_lookup_min/max``, ``model``, ``disable_by_batch_size``);
``replay_path`` / ``replay_records`` / ``force_accept`` are tessellm's benchmark-only replay
method. ``mtp`` drafts with the target checkpoint's own multi-token-prediction layer; vLLM's
per-family names for it (``MTP_ALIASES``) are taken as ``mtp``. Given as a JSON string (``--speculative-config '{"method": "ngram",
"num_speculative_tokens": 3}'``) or a dict (``LLM(speculative_config={...})``);
``parse_speculative_config`` turns either into this dataclass or raises one ``ValueError``
naming the problem and the fix.

Load policy (``num_drafts``): a step drafts ``num_speculative_tokens`` per decoding request
while the step's running batch has fewer than ``disable_by_batch_size`` requests, and none at
or above it: a large batch is compute-bound already, so verifying rejected drafts only costs.
The scheduler further cuts drafts to the step's token budget, the context and ``max_tokens``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from tessellm.json_arg import json_object_arg

METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp", "replay")
MODEL_METHODS = ("draft_model", "eagle", "eagle3")  # need ``model``
# vLLM's per-family names of the MTP method: the same drafter (the target's own MTP layers)
MTP_ALIASES = ("deepseek_mtp", "glm4_moe_mtp", "qwen3_next_mtp", "ernie_mtp", "mimo_mtp")
DEFAULT_DISABLE_BY_BATCH_SIZE = 16
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # n-gram: the longest suffix of at most max (and at least min) tokens that occurred before
    # in the request's prompt + output is matched; the tokens that followed it are the drafts.
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    # draft_model / eagle / eagle3: the draft model's or EAGLE head's directory. mtp: none (the
    # target's own checkpoint holds the MTP layers); if given, the target's directory.
    model: Optional[str] = None
    # Load policy: no drafts in a step whose batch has at least this many requests (0: never
    # off). None: DEFAULT_DISABLE_BY_BATCH_SIZE.
    disable_by_batch_size: Optional[int] = None
    # draft_model only: the draft's load format ("auto" or "dummy": random weights, for timing).
    draft_load_format: str = "auto"
    # replay (benchmark only): the outputs of an earlier identical greedy run, as a JSON file
    # (``replay_path``) or inline (``replay_records``): a list of {"prompt_token_ids": [...],
    # "output_token_ids": [...]}; a request whose prompt matches one proposes its next tokens.
    replay_path: Optional[str] = None
    replay_records: Optional[list] = None
    # replay only, benchmark mode: every draft is accepted. The verify pass runs in full and the
    # target samples every row, but the accept step keeps all k drafts plus the target's token
    # after them (``runner_output.accept``), so a step emits k + 1 tokens even where the verify
    # pass rounds differently from the run that recorded the drafts (random weights in bf16).
    # Outputs are then no longer the target's greedy tokens: it measures the verify path only.
    force_accept: bool = False

    def __post_init__(self) -> None:
        if self.method in MTP_ALIASES:
            self.method = "mtp"
        self._validate()
        if self.method == "ngram":
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min, self.prompt_lookup_max = 2, 5
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = min(2, self.prompt_lookup_max)
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = max(5, self.prompt_lookup_min)
        if self.disable_by_batch_size is None:
            self.disable_by_batch_size = DEFAULT_DISABLE_BY_BATCH_SIZE

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method {self.method!r} is not supported; use one "
                             f"of {', '.join(METHODS)}.")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer from 1 to "
                             f"{MAX_SPECULATIVE_TOKENS}, got {k!r}.")
        for name in ("prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            value = getattr(self, name)
            low = 0 if name == "disable_by_batch_size" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"speculative_config {name} must be an integer >= {low}, got {value!r}.")
        if (self.prompt_lookup_min is not None and self.prompt_lookup_max is not None
                and self.prompt_lookup_min > self.prompt_lookup_max):
            raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) is larger "
                             f"than prompt_lookup_max ({self.prompt_lookup_max}); swap them.")
        if self.method in MODEL_METHODS and not self.model:
            raise ValueError(f"speculative_config method {self.method!r} needs \"model\": the draft "
                             "model's or EAGLE head's directory.")
        if self.method == "replay" and (self.replay_path is None) == (self.replay_records is None):
            raise ValueError("speculative_config method 'replay' needs exactly one of replay_path "
                             "(a JSON file of recorded outputs) or replay_records (the list itself).")
        if not isinstance(self.force_accept, bool):
            raise ValueError(f"speculative_config force_accept must be true or false, got {self.force_accept!r}.")
        if self.force_accept and self.method != "replay":
            raise ValueError(f"speculative_config force_accept is a benchmark mode of the replay method "
                             f"only (it would change the outputs of {self.method!r}); remove it.")
        if self.draft_load_format not in ("auto", "dummy"):
            raise ValueError(f"speculative_config draft_load_format {self.draft_load_format!r} is not "
                             "supported; use auto or dummy.")

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots the scheduler keeps past a request's computed tokens: a draft model writes
        the K/V of its own drafts there (n-gram and replay write none)."""
        return self.num_speculative_tokens if self.method in MODEL_METHODS + ("mtp",) else 0

    def max_verifying_seqs(self, max_num_seqs: int) -> int:
        """The most requests of one step that verify drafts: those of a step that drafted
        (``num_drafts``: fewer than ``disable_by_batch_size``), every one without that limit.
        The other requests of the step (new prompts joined since) sample one token each."""
        if self.disable_by_batch_size:
            return min(max_num_seqs, self.disable_by_batch_size - 1)
        return max_num_seqs

    def num_drafts(self, batch_size: int) -> int:
        """Drafts per decoding request for a step with ``batch_size`` running requests."""
        if self.disable_by_batch_size and batch_size >= self.disable_by_batch_size:
            return 0
        return self.num_speculative_tokens

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


def parse_speculative_config(value: Any) -> Optional[SpeculativeConfig]:
    """A ``SpeculativeConfig`` from a JSON string, a dict or a config (None stays None)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    value = json_object_arg(value, "speculative_config", '{"method": "ngram", "num_speculative_tokens": 3}')
    names = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"speculative_config has unknown field(s) {unknown}; the fields are "
                         f"{', '.join(sorted(names))}.")
    for required in ("method", "num_speculative_tokens"):
        if required not in value:
            raise ValueError(f"speculative_config needs \"{required}\" (e.g. {{\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 3}).")
    return SpeculativeConfig(**value)
