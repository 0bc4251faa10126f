"""A tool parser written as a vLLM ``--tool-parser-plugin`` file, only its import line changed
(vLLM's: ``from vllm.entrypoints.openai.protocol import ...`` and
``from vllm.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager``).

Its format: content, then ``<<call>>`` and a JSON array of ``{"name", "arguments"}`` objects,
then ``<</call>>``. It has no ``extract_tool_calls_streaming``: a stream gets its calls from
``extract_tool_calls`` once the output is final."""

import json
import re

from tessellm.entrypoints.openai.tool_parsers import (ChatCompletionRequest,
                                                      ExtractedToolCallInformation, FunctionCall, ToolCall,
                                                      ToolParser, ToolParserManager)


@ToolParserManager.register_module(["toy_json", "toy"])
class ToyJsonToolParser(ToolParser):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.start, self.end = "<<call>>", "<</call>>"
        self.regex = re.compile(r"<<call>>(.*?)(?:<</call>>|$)", re.DOTALL)

    def adjust_request(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        request.skip_special_tokens = False
        return request

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        if self.start not in model_output:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        if "explode" in model_output:
            raise RuntimeError("a plugin bug")
        try:
            calls = json.loads(self.regex.search(model_output).group(1))
            tool_calls = [ToolCall(type="function", function=FunctionCall(
                name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))) for c in calls]
        except (ValueError, KeyError, TypeError):
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        content = model_output[:model_output.find(self.start)]
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls, content=content or None)
