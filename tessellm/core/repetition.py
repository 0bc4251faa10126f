"""vLLM's ``repetition_detection``: stop a request whose output ends in one pattern repeated.

The rule (vLLM's ``check_sequence_repetition``): the output *ends* with ``min_count`` copies of
one pattern of some length ``L`` in ``[min_pattern_size (0 means 1), max_pattern_size]``; only
the output tokens count, never the prompt. The request then finishes with reason
``"repetition"`` and stop reason ``"repetition_detected"``.

Invariant that makes it incremental (O(max_pattern_size) per token at most, whatever the output's
length): the last ``L * min_count`` tokens are ``min_count`` copies of one ``L``-pattern exactly
when each of the last ``L * (min_count - 1)`` tokens equals the token ``L`` before it. So per
``L`` one counter, ``runs[L]``: how many tokens in a row (ending at the newest) equal the token
``L`` before them::

    output:   a b c a b c a b c          L = 3, min_count = 3
    equal L back?     . . . y y y y y y  runs[3] = 6 >= 3 * (3 - 1): repetition
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class RepetitionDetectionParams:
    """vLLM's fields and defaults; all 0 is off."""

    max_pattern_size: int = 0  # longest pattern looked for; 0 disables the detection
    min_pattern_size: int = 0  # shortest pattern looked for; 0 means 1
    min_count: int = 0  # copies in a row that stop the request; >= 2 when max_pattern_size > 0

    def __post_init__(self) -> None:
        for name in ("max_pattern_size", "min_pattern_size", "min_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value >= 2 ** 63:
                raise ValueError(f"repetition_detection.{name} must be an integer below 2**63, got {value!r}.")
        if self.max_pattern_size < 0 or self.min_pattern_size < 0 or self.min_pattern_size > self.max_pattern_size:
            raise ValueError("repetition_detection: max_pattern_size and min_pattern_size must be >= 0, with "
                             f"min_pattern_size <= max_pattern_size (got {self.min_pattern_size} > "
                             f"{self.max_pattern_size} or a negative one); set both to 0 to disable it.")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError(f"repetition_detection.min_count must be >= 2 to detect a repetition, got "
                             f"{self.min_count}; or set max_pattern_size to 0 to disable it.")

    @property
    def enabled(self) -> bool:
        return self.max_pattern_size > 0

    @classmethod
    def coerce(cls, value) -> Optional["RepetitionDetectionParams"]:
        """A RepetitionDetectionParams from itself or a dict of its fields (an OpenAI request's
        JSON, msgpack's form of it); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"max_pattern_size", "min_pattern_size", "min_count"})
            if unknown:
                raise ValueError(f"repetition_detection has unknown field(s) {unknown}; its fields are "
                                 "max_pattern_size, min_pattern_size and min_count.")
            return cls(**value)
        raise ValueError("repetition_detection must be a RepetitionDetectionParams or an object with "
                         f"max_pattern_size, min_pattern_size and min_count; got {type(value).__name__}.")


class RepetitionDetector:
    """One request's counters (``runs``); ``add`` each output token in order.

    ``runs`` grows with the output: a length ``L`` has no token ``L`` back before the output's
    ``L + 1``-th token, so its counter starts there at 0. Memory and time per token are
    O(min(max_pattern_size, output length)), whatever ``max_pattern_size`` a request asks
    (a huge one must neither allocate its size in the engine core nor loop over it)."""

    def __init__(self, params: RepetitionDetectionParams):
        self.low = max(1, params.min_pattern_size)
        self.high = params.max_pattern_size
        self.min_count = params.min_count
        self.runs = [0]  # runs[L] for the lengths L < len(runs) the output has reached

    def add(self, tokens: Sequence[int], num_prompt: int = 0) -> bool:
        """``tokens``: the prompt (``num_prompt`` tokens, not looked at) then the output so far,
        its newest token (just appended) last; O(min(max_pattern_size, output length)). True
        when the output now ends with ``min_count`` copies of a pattern."""
        last = len(tokens) - 1
        n, newest = last + 1 - num_prompt, tokens[last]
        top = min(self.high, n - 1)  # longer lengths have no token L back yet: their runs stay 0
        runs = self.runs
        if len(runs) <= top:
            runs.extend([0] * (top + 1 - len(runs)))
        found = False
        for length in range(self.low, top + 1):
            if tokens[last - length] == newest:
                runs[length] += 1
                found = found or runs[length] >= length * (self.min_count - 1)
            else:
                runs[length] = 0
        return found

