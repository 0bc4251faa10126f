"""What the HTTP layer needs beyond the engine: names, the API key, limits, keep-alive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ServerConfig:
    served_model_names: list[str]  # the first one is reported in responses
    api_key: Optional[str] = None  # None: no authentication
    extra_api_keys: tuple = ()  # --api-key K1 K2 ...: the others, accepted alike (vLLM's list)
    chat_template: Optional[str] = None  # template text (already read from --chat-template)
    # --chat-template-content-format (vLLM's): a message's content as the template gets it,
    # "string" / "openai" (a list of parts) / "auto" (detected from the template: chat_utils.py)
    chat_template_content_format: str = "auto"
    tool_call_parser: Optional[str] = None  # --tool-call-parser: parses tool_choice "auto" output
    tool_parser_plugin: Optional[str] = None  # --tool-parser-plugin: a vLLM parser file registering names
    max_n: int = 16  # most samples per request (n, best_of)
    max_logprobs: int = 20  # most top logprobs per token (logprobs / top_logprobs); -1: no limit
    max_tokens: Optional[int] = None  # most output tokens per request; None: the context length
    max_prompts: int = 64  # most prompts in one /v1/completions request
    max_body_bytes: int = 4 << 20  # request body
    max_header_bytes: int = 32 << 10  # all request headers together
    sse_keepalive_s: float = 10.0  # an SSE comment after this much silence on a stream
    open_paths: frozenset = field(default_factory=lambda: frozenset(
        {"/health", "/ping", "/ready", "/version", "/metrics", "/load"}))  # answered while draining
    lora_modules: list = field(default_factory=list)  # --lora-modules: [(name, path)] at start
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and unload allowed
    responses_store_size: int = 0  # --responses-store-size: responses kept for previous_response_id
    lora: Any = None  # the served adapters (openai.lora_modules.LoRAModules) with --enable-lora
    # vLLM's server settings
    response_role: str = "assistant"  # --response-role: the reply's role (add_generation_prompt)
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids: the field's default
    default_chat_template_kwargs: Optional[dict] = None  # under a request's chat_template_kwargs
    trust_request_chat_template: bool = False  # a request's chat_template is used (else a 400)
    root_path: str = ""  # --root-path: the prefix a proxy may leave on paths
    cors: Optional[dict] = None  # --allowed-origins ...: CORSMiddleware's settings; None: no CORS
    middleware: list = field(default_factory=list)  # --middleware: import paths
    request_id_headers: bool = False  # --enable-request-id-headers: X-Request-Id on responses
    prompt_tokens_details: bool = False  # --enable-prompt-tokens-details: usage's cached_tokens
    force_include_usage: bool = False  # --enable-force-include-usage: usage at the end of every stream
    log_requests: bool = False  # --enable-log-requests: prompts and params in the log
    log_outputs: bool = False  # --enable-log-outputs: finished outputs in the log
    max_log_len: Optional[int] = None  # --max-log-len: characters / ids per logged field
    # --exclude-tools-when-tool-choice-none (vLLM's): a request's tools are not shown to the chat
    # template when its tool_choice is "none"
    exclude_tools_when_tool_choice_none: bool = False

    def lora_for(self, name: Optional[str]):
        """The LoRARequest the ``model`` field names, or None (the base model)."""
        return self.lora.get(name) if self.lora is not None and name else None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
