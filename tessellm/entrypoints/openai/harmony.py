"""gpt-oss's harmony format at /v1/chat/completions: the analysis channel in ``reasoning`` (and
vLLM's ``reasoning_content``), the final channel in ``content``, messages to ``functions.NAME``
in ``tool_calls`` (``finish_reason`` "tool_calls"), whole or streamed.

On for a gpt-oss checkpoint (the engine resolves ``--reasoning-parser`` to ``openai_gptoss``)
or with ``--reasoning-parser openai_gptoss`` / ``--tool-call-parser openai`` on any model.
The prompt is the model's chat template, which writes the tools, ``reasoning_effort`` and
earlier calls and their results as harmony expects; generation stops at ``<|call|>`` (a tool
call ends the turn) or ``<|return|>`` (the answer did), added to each request's stop tokens.
The text is parsed with its special tokens kept (``tessellm/reasoning/harmony.py``).
"""

from __future__ import annotations

from typing import Optional

from tessellm.entrypoints.openai.reasoning import reasoning_fields
from tessellm.entrypoints.openai.tool_parsers import HarmonyToolParser
from tessellm.entrypoints.openai.tools import ToolCallView, ToolPlan
from tessellm.reasoning.harmony import CALL, RETURN, prompt_header
from tessellm.reasoning.parsers import PROMPT_TAIL_TOKENS, get_reasoning_parser

TOOL_PARSER = "openai"  # --tool-call-parser's name for it (vLLM's)


def harmony_on(engine, tool_call_parser: Optional[str]) -> bool:
    name = getattr(engine.info, "reasoning_parser", None)
    plugin = getattr(getattr(engine, "args", None), "reasoning_parser_plugin", None)
    return (name is not None and get_reasoning_parser(name, plugin).harmony) or tool_call_parser == TOOL_PARSER


def stop_ids(tokenizer) -> list[int]:
    """``<|call|>`` and ``<|return|>`` as token ids, where the tokenizer has them as tokens."""
    ids = []
    for marker in (CALL, RETURN):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.decode([tid]) == marker:
            ids.append(tid)
    return ids


def template_tools(tools: Optional[list[dict]]) -> Optional[list[dict]]:
    """The tools for gpt-oss's template, which writes ``"// " + description`` for each and
    fails on one without (OpenAI's description is optional): an empty one where absent."""
    if not tools:
        return tools
    return [{**t, "function": {"description": "", **t["function"]}} for t in tools]


class HarmonyPlan:
    """What one request's harmony output means: calls parsed unless tool_choice is none (or no
    tools), the reasoning kept unless ``include_reasoning`` is false."""

    def __init__(self, tools: ToolPlan, include_reasoning: bool, tokenizer, prompt_token_ids):
        self.tools = tools
        self.include = include_reasoning
        tail = tokenizer.decode(list(prompt_token_ids[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False)
        self.opened = prompt_header(tail)  # a template that opens the first message's header

    def adjust(self, params, tokenizer) -> None:
        params.skip_special_tokens = False  # the markers are special tokens
        params.stop_token_ids = list(dict.fromkeys([*(params.stop_token_ids or []), *stop_ids(tokenizer)]))

    def view(self) -> ToolCallView:
        forced = self.tools.parser if self.tools.mode in ("required", "named") else None
        return ToolCallView(HarmonyToolParser(calls=self.tools.mode != "none", forced=forced, opened=self.opened))

    def fields(self, reasoning: Optional[str]) -> dict:
        return reasoning_fields(reasoning, self.include)


class HarmonyStream:
    """One streamed choice: new reasoning, content and tool-call pieces since the last call."""

    def __init__(self, plan: HarmonyPlan):
        self.plan = plan
        self.view = plan.view()
        self.sent_reasoning = 0

    def delta(self, text: str, final: bool):
        """``(reasoning fields, new content, tool-call pieces)``."""
        content, pieces = self.view.delta(text, final)
        reasoning = self.view.parser.reasoning or ""
        new = reasoning[self.sent_reasoning:]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        return self.plan.fields(new or None), content, pieces
