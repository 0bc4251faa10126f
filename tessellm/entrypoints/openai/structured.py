"""From an OpenAI/vLLM request to one ``StructuredOutputsParams`` (or None).

Sources, at most one per request (two are refused naming both): ``response_format``
(json_object / json_schema / structural_tag; "text" is no constraint), vLLM's
``structured_outputs`` object, the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` fields, and a tool choice that forces a call (``ToolPlan.forced_schema``).
A ``structured_outputs`` object with only options (``disable_any_whitespace``) applies them to
the constraint given another way.
The constraint itself is checked (size, nesting, a schema or grammar xgrammar can parse) here,
so a malformed one is a 400 before anything is queued.
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.errors import bad_request
from tessellm.structured_output.grammar import build_grammar
from tessellm.structured_output.params import StructuredOutputsParams

_OPTIONS = {"disable_any_whitespace"}  # structured_outputs fields that are not a constraint
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_from_request(req, forced_tool_schema: Optional[dict] = None) -> Optional[StructuredOutputsParams]:
    sources: list[tuple[str, dict]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        sources.append(("response_format", _from_response_format(fmt)))
    options = {}
    if req.structured_outputs is not None:
        so = {k: v for k, v in req.structured_outputs.items() if v is not None}
        if set(so) <= _OPTIONS:
            options = so  # only options: they apply to the constraint given another way
        else:
            sources.append(("structured_outputs", so))
    for name, kind in _GUIDED.items():
        if getattr(req, name) is not None:
            sources.append((name, {kind: getattr(req, name)}))
    if forced_tool_schema is not None:
        sources.append(("tool_choice", {"json": forced_tool_schema}))
    if not sources:
        return None
    if len(sources) > 1:
        names = " and ".join(name for name, _ in sources)
        raise bad_request(f"The request sets {names}; give at most one output constraint.", sources[1][0])
    param, fields = sources[0]
    fields = {**fields, **options}
    if _has_huge_int(fields):
        raise bad_request(f"{param} holds an integer that does not fit in 64 bits; the engine cannot carry "
                          "it (use a smaller number or a string).", param, "invalid_structured_output")
    try:
        params = StructuredOutputsParams.from_dict(fields)
        build_grammar(params)  # malformed schema / grammar / regex: refused here, by name
    except ValueError as exc:
        where = _FIELD_NAMES.get((param, _kind(fields)), param)
        message = str(exc).replace(f"structured_outputs.{_kind(fields)}", where).replace("structured_outputs", where)
        raise bad_request(message, param, "invalid_structured_output") from None
    return params


# (source, constraint kind) -> the field a client wrote, for error messages.
_FIELD_NAMES = {("response_format", "json"): "response_format.json_schema.schema",
                ("tool_choice", "json"): "the forced tool call's parameters schema"}


def _has_huge_int(value) -> bool:
    """Any int msgpack cannot carry to the engine core (outside [-2**63, 2**64))?"""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -2**63 <= value < 2**64
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_huge_int(v) for v in value)
    return False


def _kind(fields: dict) -> str:
    return next((k for k, v in fields.items() if v not in (None, False)), "")


def _from_response_format(fmt) -> dict:
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema.",
                              "response_format.json_schema")
        return {"json": fmt.json_schema.json_schema}
    # structural_tag: vLLM's legacy {structures, triggers} or xgrammar's {format}
    if fmt.format is not None:
        return {"structural_tag": {"type": "structural_tag", "format": fmt.format}}
    if not fmt.structures:
        raise bad_request("response_format of type 'structural_tag' needs structures and triggers "
                          "(or format).", "response_format")
    return {"structural_tag": {"type": "structural_tag", "structures": fmt.structures,
                               "triggers": fmt.triggers or []}}
