"""The pooling half of the offline API: ``LLM.embed`` / ``classify`` / ``score`` / ``encode`` /
``reward`` on a pooling engine (``LLM(model, runner="pooling")``, docs/pooling.md), with vLLM's
arguments (``tokenization_kwargs``: tokenization_kwargs.py). ``PoolingLLM`` is ``LLM``'s base
(entrypoints/llm.py), which gives it ``engine``, ``_ids`` and ``_run``."""

from __future__ import annotations

from typing import Callable, Optional, Union

from tessellm.entrypoints.tokenization_kwargs import TokenizationKwargs


class PoolingLLM:
    """``LLM``'s pooling methods (``LLM`` itself is the class to build)."""

    def embed(self, prompts, pooling_params=None, truncate_prompt_tokens: Optional[int] = None,
              use_tqdm: Union[bool, Callable] = True, lora_request=None,
              tokenization_kwargs: Optional[dict] = None) -> list:
        """Embeddings of prompts (as ``generate`` takes them) on a pooling engine
        (``LLM(model, runner="pooling")``): one ``EmbeddingRequestOutput`` each, in input order,
        ``.outputs.embedding`` a list of floats. ``pooling_params``: one
        ``tessellm.pooling.PoolingParams`` (dimensions, normalize) or one per prompt;
        ``truncate_prompt_tokens``: keep the first k tokens of each prompt, as vLLM's pooling
        runner (docs/pooling.md)."""
        from tessellm.pooling.outputs import EmbeddingRequestOutput

        return [EmbeddingRequestOutput.from_base(o)
                for o in self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request,
                                    pooling_task="embed", tokenization_kwargs=tokenization_kwargs)]

    def classify(self, prompts, pooling_params=None, truncate_prompt_tokens: Optional[int] = None,
                 use_tqdm: Union[bool, Callable] = True, lora_request=None,
                 tokenization_kwargs: Optional[dict] = None) -> list:
        """Class probabilities of prompts on a sequence classifier (``*ForSequenceClassification``,
        docs/pooling.md): one ``ClassificationRequestOutput`` each, ``.outputs.probs`` softmax over
        the labels (sigmoid for one label; raw logits with ``PoolingParams(use_activation=False)``)."""
        from tessellm.pooling.outputs import ClassificationRequestOutput

        return [ClassificationRequestOutput.from_base(o) for o in self.encode(
            prompts, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request, pooling_task="classify",
            tokenization_kwargs=tokenization_kwargs)]

    def score(self, data_1, data_2, truncate_prompt_tokens: Optional[int] = None,
              use_tqdm: Union[bool, Callable] = True, pooling_params=None, lora_request=None,
              chat_template: Optional[str] = None, tokenization_kwargs: Optional[dict] = None) -> list:
        """Scores of text pairs (one text against many, or two lists pairwise): a cross-encoder's
        sigmoid relevance, or the cosine similarity of an embedding model's vectors
        (``tessellm.pooling.score``). One ``ScoringRequestOutput`` per pair, in order.
        ``chat_template``: a score template (Jinja over the roles ``query`` and ``document``)
        that formats a cross-encoder's pair, e.g. an LLM reranker's prompt.
        ``tokenization_kwargs``: only its truncation (the pairs are encoded as the model pairs them)."""
        from tessellm.pooling.score import run_score

        tok = TokenizationKwargs.parse(tokenization_kwargs, "score")
        if tok.changes_text_encoding:
            raise ValueError("score(tokenization_kwargs=...): add_special_tokens / do_lower_case do not "
                             "apply (each pair is encoded as the model pairs texts); leave them out.")
        if truncate_prompt_tokens is None:
            truncate_prompt_tokens = tok.truncate_prompt_tokens
        return run_score(self, data_1, data_2, truncate_prompt_tokens, use_tqdm, pooling_params, lora_request,
                         chat_template)

    def encode(self, prompts, pooling_params=None, truncate_prompt_tokens: Optional[int] = None,
               use_tqdm: Union[bool, Callable] = True, lora_request=None,
               pooling_task: Optional[str] = None, tokenization_kwargs: Optional[dict] = None) -> list:
        """As ``embed``, the vectors as tensors: ``PoolingRequestOutput.outputs.data``.
        ``pooling_task``: ``embed`` or ``classify`` (None: what the model does), or
        ``token_embed`` / ``token_classify``: a ``[prompt tokens, width]`` tensor, one row per
        prompt token (docs/pooling.md). ``tokenization_kwargs`` as ``generate``'s; an explicit
        ``truncate_prompt_tokens`` wins over theirs."""
        from dataclasses import replace

        from tessellm.pooling.params import POOLING_TASKS, PoolingParams

        if pooling_task is not None and pooling_task not in POOLING_TASKS:
            raise ValueError(f"pooling_task {pooling_task!r} is not supported; use one of "
                             f"{', '.join(POOLING_TASKS)}.")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        tok = TokenizationKwargs.parse(tokenization_kwargs, "encode")
        prompts = [tok.tokenized(p, self.engine, "encode") for p in prompts]
        if truncate_prompt_tokens is None:
            truncate_prompt_tokens = tok.truncate_prompt_tokens
        params = pooling_params if isinstance(pooling_params, (list, tuple)) else [pooling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Got {len(params)} PoolingParams for {len(prompts)} prompts; give one, "
                             "or one per prompt.")
        if truncate_prompt_tokens is not None:
            params = [replace(p or PoolingParams(), truncate_prompt_tokens=truncate_prompt_tokens)
                      for p in params]
        if pooling_task is not None:
            params = [replace(p or PoolingParams(), task=pooling_task) for p in params]
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, per_prompt_lora(lora_request, len(prompts))):
                rid = str(next(self._ids))
                self.engine.add_pooling_request(rid, prompt, p, lora)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def reward(self, prompts, pooling_params=None, truncate_prompt_tokens: Optional[int] = None,
               use_tqdm: Union[bool, Callable] = True, lora_request=None,
               tokenization_kwargs: Optional[dict] = None) -> list:
        """vLLM's: a reward model's scores per prompt token, i.e. ``encode(...,
        pooling_task="token_classify")``: ``.outputs.data`` is ``[prompt tokens, labels]``."""
        return self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm, lora_request,
                           pooling_task="token_classify", tokenization_kwargs=tokenization_kwargs)


def per_prompt_lora(lora, n: int) -> list:
    """``lora_request`` as one entry per prompt: one adapter (or None) for all, or a list of one each."""
    if lora is None or not isinstance(lora, (list, tuple)):
        return [lora] * n
    if len(lora) != n:
        raise ValueError(f"Got {len(lora)} LoRA requests for {n} prompts; give one, or one per prompt.")
    return list(lora)
