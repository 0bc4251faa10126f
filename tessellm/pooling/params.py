"""Per-request pooling parameters (vLLM's ``PoolingParams``) and what they do to a vector.

The engine core pools (``pooler.py``) and sends the raw pooled vector; the front end applies a
request's ``dimensions`` and ``normalize`` to it, in that order, as vLLM's embedding head does::

    pooled [hidden]  --dimensions=d-->  pooled[:d]  --normalize-->  v / max(||v||, eps)

(Matryoshka: a model trained so a prefix of its embedding is itself an embedding; truncating,
then normalizing, gives that smaller embedding.)

A classifier's vector is its score head's logits; ``use_activation`` turns them into
probabilities, as vLLM's classify head does: softmax over the labels, or sigmoid when there is
one label (a cross-encoder's relevance score)::

    logits [num_labels]  --use_activation-->  softmax(logits)  (num_labels > 1)  |  sigmoid(logit)  (1)

The per-token tasks do the same to each prompt token's row (vLLM's ``token_embed`` and
``token_classify``): ``[tokens, hidden]`` -> ``[tokens, d]``, each row normalized; or
``[tokens, num_labels]`` logits, each row through the activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from tessellm.core.scheduler_config import RequestParamError, check_truncate_prompt_tokens

_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm
# What a pooling request asks for (vLLM's PoolingTask names): one vector per prompt, or one row
# per prompt token ("token_*"); an engine does the embed pair or the classify pair.
POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify")


@dataclass
class PoolingParams:
    """``dimensions``: keep the first d values (then normalize; 1 <= d <= hidden size).
    ``normalize``: L2-normalize (None: the engine's ``PoolerConfig.normalize``, true by default).
    ``truncate_prompt_tokens``: keep only the first k prompt tokens (-1: as many as fit), vLLM's
    pooling side (core/prompt_truncation.py).
    ``use_activation``: a classifier's softmax / sigmoid (None: the engine's pooler config, true
    by default). ``task``: one of ``POOLING_TASKS`` (None: ``embed`` or ``classify``, what the
    engine's model does; ``token_embed`` / ``token_classify``: a row per prompt token)."""

    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None
    use_activation: Optional[bool] = None
    task: Optional[str] = None

    def verify(self, hidden_size: int, matryoshka: Optional[list[int]] = None) -> None:
        """RequestParamError (a 400 at the server) naming the bad field and the fix."""
        d = self.dimensions
        if d is not None:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise RequestParamError(f"dimensions must be a positive integer, got {d!r}.", "dimensions")
            if d > hidden_size:
                raise RequestParamError(f"dimensions is {d}, more than this model's embedding size "
                                        f"{hidden_size}; ask for at most {hidden_size}.", "dimensions")
            if matryoshka and d not in matryoshka:
                raise RequestParamError(f"dimensions {d} is not one this model was trained for; "
                                        f"use one of {sorted(matryoshka)}.", "dimensions")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise RequestParamError(f"normalize must be true or false, got {self.normalize!r}.", "normalize")
        if self.use_activation is not None and not isinstance(self.use_activation, bool):
            raise RequestParamError(f"use_activation must be true or false, got {self.use_activation!r}.",
                                    "use_activation")
        check_truncate_prompt_tokens(self.truncate_prompt_tokens)

    def apply(self, pooled, default_normalize: bool) -> np.ndarray:
        """The embedding (float32) from the engine's raw pooled vector, or each row of a
        per-token task's ``[tokens, width]`` array."""
        v = np.asarray(pooled, dtype=np.float32)
        if self.task in ("classify", "token_classify"):
            return activate(v) if self.use_activation is not False else v
        if self.dimensions is not None:
            v = v[..., :self.dimensions]
        normalize = default_normalize if self.normalize is None else self.normalize
        if normalize:
            norms = np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True)
            v = v / np.maximum(norms, _EPS)
        return v.astype(np.float32)


def activate(logits: np.ndarray) -> np.ndarray:
    """A classifier's probabilities over the last axis: softmax over its labels, sigmoid for
    a single one."""
    x = logits.astype(np.float64)
    if x.shape[-1] == 1:
        p = 1.0 / (1.0 + np.exp(-x))
    else:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
    return p.astype(np.float32)


def matryoshka_dimensions(hf_config) -> Optional[list[int]]:
    """The sizes a Matryoshka model declares (``matryoshka_dimensions`` in config.json), or None
    (any size up to the hidden size is allowed then)."""
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    return [int(d) for d in dims] if dims else None
