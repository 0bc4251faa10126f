"""A tool parser written as a vLLM ``--tool-parser-plugin`` file that streams its calls itself
(``extract_tool_calls_streaming``), only its import line changed from vLLM's.

Its format: content, then calls ``<<NAME|{json}>>``: the name streamed once its ``|`` is
written, the arguments as they grow (as vLLM's parsers do); a trailing ``9`` of the arguments
is held back (the end-of-stream check sends it); "boom" in a delta raises. It checks the token
ids it is handed (those before the delta, then the delta's, are those after it; text comes with
ids): ids that do not match raise, so the rest of the output is content."""

from tessellm.entrypoints.openai.tool_parsers import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                      ExtractedToolCallInformation, FunctionCall, ToolCall,
                                                      ToolParser, ToolParserManager)


@ToolParserManager.register_module("toy_stream")
class ToyStream(ToolParser):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.seen = []  # (previous_text, current_text, delta_text, previous ids, ids, delta ids)
        self.content_sent = 0  # characters of content streamed

    def extract_tool_calls(self, model_output, request):
        calls = [c.split("|", 1) for c in model_output.split("<<")[1:]]
        return ExtractedToolCallInformation(tools_called=bool(calls), content=model_output.split("<<")[0] or None,
                                            tool_calls=[ToolCall(function=FunctionCall(name=n, arguments=a[:-2]))
                                                        for n, a in calls])

    def extract_tool_calls_streaming(self, previous_text, current_text, delta_text, previous_token_ids,
                                     current_token_ids, delta_token_ids, request):
        self.seen.append((previous_text, current_text, delta_text, list(previous_token_ids),
                          list(current_token_ids), list(delta_token_ids)))
        previous_ids, ids, delta_ids = self.seen[-1][3:]
        if previous_ids + delta_ids != ids or (current_text and not ids):
            raise RuntimeError(f"token ids {previous_ids} + {delta_ids} are not {ids} (text {current_text!r})")
        if "boom" in delta_text:
            raise RuntimeError("a plugin bug")
        pieces = []
        for index, call in enumerate(current_text.split("<<")[1:]):
            if "|" not in call:
                continue
            name, args = call.split("|", 1)
            args = args.rstrip(">")
            if index >= len(self.streamed_args_for_tool):
                self.streamed_args_for_tool.append("")
                self.prev_tool_call_arr.append({"name": name})
                pieces.append(DeltaToolCall(index=index, function=DeltaFunctionCall(name=name, arguments="")))
            self.prev_tool_call_arr[index]["arguments"] = args
            new = args[len(self.streamed_args_for_tool[index]):]
            if new and not args.endswith("9"):
                self.streamed_args_for_tool[index] = args
                pieces.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=new)))
        return DeltaMessage(content=self._content(current_text), tool_calls=pieces or None)

    def _content(self, current_text):
        """The content not streamed yet: the text before the first ``<<``, less a trailing
        ``<`` while no ``<<`` is written (it may start one)."""
        head = current_text.split("<<")[0]
        if "<<" not in current_text and head.endswith("<"):
            head = head[:-1]
        new = head[self.content_sent:]
        self.content_sent = max(self.content_sent, len(head))
        return new or None
