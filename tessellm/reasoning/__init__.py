"""Reasoning (thinking) models: parsers that split reasoning from the answer (parsers.py, split.py)."""

from tessellm.reasoning.parsers import (ANSWER, REASONING, REASONING_PARSERS, UNDECIDED, ReasoningParser,
                                        ThinkMarkers, check_reasoning_parser, get_reasoning_parser)
from tessellm.reasoning.split import ReasoningSplit

__all__ = ["ANSWER", "REASONING", "REASONING_PARSERS", "UNDECIDED", "ReasoningParser", "ReasoningSplit",
           "ThinkMarkers", "check_reasoning_parser", "get_reasoning_parser"]
