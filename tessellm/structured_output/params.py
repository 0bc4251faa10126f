"""What a request constrains its output to: vLLM's ``StructuredOutputsParams``.

Plain data (no xgrammar import), so it travels inside ``SamplingParams`` to the engine core
through msgpack. Exactly one of the constraint fields is set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

# The constraint fields, in the order a request is checked for them.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """One output constraint. Field names and meanings are vLLM's.

    - ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON value valid
      against it.
    - ``regex``: the output matches this regular expression (whole output).
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: an EBNF grammar (GBNF / xgrammar dialect, start symbol ``root``).
    - ``json_object``: True: the output is any JSON object.
    - ``structural_tag``: xgrammar's structural tag (a dict or its JSON text): free text with
      tagged regions (e.g. ``<function=f>{...}</function>``) whose contents follow schemas.
    - ``disable_any_whitespace``: JSON without optional whitespace (compact), which keeps small
      models from looping on spaces and newlines.
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[Union[str, dict]] = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            found = ", ".join(set_kinds) or "none"
            raise ValueError("structured_outputs must set exactly one of "
                             f"{', '.join(KINDS)}; got {found}.")
        if self.choice is not None:
            if not (isinstance(self.choice, list) and self.choice
                    and all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, dict, bool)):
                raise ValueError(f"structured_outputs.{name} must be a JSON object or its JSON text, "
                                 f"got {type(value).__name__}.")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def spec_text(self) -> str:
        """The constraint as canonical text: equal constraints give equal text."""
        value: Any = getattr(self, self.kind)
        if self.kind in ("json", "structural_tag"):
            if isinstance(value, str):
                value = _parse_json(value, f"structured_outputs.{self.kind}")
            return json.dumps(value, separators=(",", ":"))  # key order kept: it orders the output
        if self.kind == "choice":
            return json.dumps(value)
        if self.kind == "json_object":
            return "object"
        return value

    def cache_key(self) -> str:
        """A hash of everything that shapes the compiled grammar."""
        text = f"{self.kind}\0{int(self.disable_any_whitespace)}\0{self.spec_text()}"
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredOutputsParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}.")
        return cls(**{k: v for k, v in d.items() if v is not None})


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}.") from None
