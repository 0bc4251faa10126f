"""A ``--reasoning-parser-plugin`` file as a vLLM user writes one, its import lines changed
from ``vllm.reasoning`` / ``vllm.entrypoints.openai.protocol`` to ``tessellm.reasoning.plugins``.

``think_tags`` is written the way vLLM's own parsers are (token ids, per-delta branches, no
hold-back); ``seed_tags`` is a ``BaseThinkingReasoningParser`` that names its markers only.
"""

from tessellm.reasoning.plugins import (BaseThinkingReasoningParser, ChatCompletionRequest, DeltaMessage,
                                        ReasoningParser, ReasoningParserManager)


@ReasoningParserManager.register_module(["think_tags", "think_tags_too"])
class ThinkTagsParser(ReasoningParser):
    """Reasoning only inside ``<think>`` ... ``</think>`` (both single tokens)."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self.start_id = self.vocab["<think>"]
        self.end_id = self.vocab["</think>"]
        self.chat_template_kwargs = kwargs.get("chat_template_kwargs")

    def is_reasoning_end(self, input_ids):
        for token in reversed(input_ids):
            if token in (self.start_id, self.end_id):
                return token == self.end_id
        return False

    def extract_content_ids(self, input_ids):
        return input_ids[input_ids.index(self.end_id) + 1:] if self.end_id in input_ids[:-1] else []

    def extract_reasoning(self, model_output: str, request: ChatCompletionRequest):
        if not model_output.startswith("<think>") or "</think>" not in model_output:
            return None, model_output
        reasoning, _, content = model_output[len("<think>"):].partition("</think>")
        return reasoning, content or None

    def extract_reasoning_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                    current_token_ids, delta_token_ids):
        if self.start_id not in current_token_ids:
            return DeltaMessage(content=delta_text)
        if list(delta_token_ids) in ([self.start_id], [self.end_id]):
            return None
        if self.end_id in previous_token_ids:
            return DeltaMessage(content=delta_text)
        if self.end_id in delta_token_ids:
            before, _, after = delta_text.partition("</think>")
            return DeltaMessage(reasoning=before.replace("<think>", ""), content=after or None)
        return DeltaMessage(reasoning=delta_text.replace("<think>", ""))


@ReasoningParserManager.register_module("seed_tags")
class SeedTagsParser(BaseThinkingReasoningParser):
    @property
    def start_token(self):
        return "<seed:think>"

    @property
    def end_token(self):
        return "</seed:think>"


class NotRegistered(ReasoningParser):
    pass
