"""``prompt_embeds``: a prompt given as embeddings ``[tokens, hidden]`` instead of token ids
(vLLM's ``{"prompt_embeds": tensor}`` and the completions API's base64 ``torch.save`` bytes).

How such a request travels::

    front end        tensor -> checked (2-D, hidden size, floating, finite) -> cast to the
                     model's dtype -> PromptEmbeds (bytes, shape, dtype, sha256); the prompt's
                     token ids are placeholders (0), one per row
    scheduler        plain data; its sha256 joins every block's prefix-cache key, so only
                     requests with the same embeddings share cached blocks
    model runner     at prompt positions the step's input embeddings are these rows instead of
                     ``embed_tokens(id)``; generated tokens are embedded as usual. A step with such
                     rows runs eagerly (captured decode graphs take token ids). The rows' device
                     copy is dropped once the prompt's last rows are in a step (decoding does not
                     hold prompt x hidden bytes of device memory the KV sizing never counted).

Plain data (bytes, ints, strings) across processes: never pickle. The server reads vLLM's
base64 ``torch.save`` bytes with ``torch.load(weights_only=True)`` (tensors only, no code).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PromptEmbeds:
    identifier: str  # sha256 of dtype, shape and bytes: the prefix-cache key
    data: bytes = field(repr=False)  # the rows, C order, in ``dtype``
    shape: list[int] = field(default_factory=list)  # [tokens, hidden]
    dtype: str = "float32"

    @property
    def num_tokens(self) -> int:
        return self.shape[0]

    @classmethod
    def from_tensor(cls, tensor, hidden_size: int, dtype: str) -> "PromptEmbeds":
        """Checked and cast to the model's ``dtype``; ValueError naming the problem."""
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"prompt_embeds must be a torch.Tensor of shape [tokens, {hidden_size}], "
                             f"got {type(tensor).__name__}.")
        if tensor.layout != torch.strided:
            raise ValueError(f"prompt_embeds must be a dense tensor, got layout "
                             f"{str(tensor.layout).replace('torch.', '')}; call .to_dense() first.")
        if tensor.dim() == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 2:
            raise ValueError(f"prompt_embeds must be 2-D [tokens, {hidden_size}], got shape "
                             f"{list(tensor.shape)}.")
        if tensor.shape[1] != hidden_size:
            raise ValueError(f"prompt_embeds rows have {tensor.shape[1]} values but this model's hidden "
                             f"size is {hidden_size}; give embeddings of this model.")
        if tensor.shape[0] == 0:
            raise ValueError("prompt_embeds is empty; give at least one row.")
        if not tensor.is_floating_point():
            raise ValueError(f"prompt_embeds must be floating point (float32, bfloat16 or float16), "
                             f"got {str(tensor.dtype).replace('torch.', '')}.")
        tensor = tensor.detach().to("cpu", getattr(torch, dtype)).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError("prompt_embeds holds NaN or infinite values.")
        data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        digest = hashlib.sha256(f"{dtype}{list(tensor.shape)}".encode())
        digest.update(data)
        return cls(digest.hexdigest(), data, list(tensor.shape), dtype)

    def tensor(self, device=None):
        """The rows as a tensor (on ``device``)."""
        import torch

        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        out = flat.view(getattr(torch, self.dtype)).view(self.shape)
        return out if device is None else out.to(device)

    def to_dict(self) -> dict:
        return {"identifier": self.identifier, "data": self.data, "shape": list(self.shape),
                "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d) -> Optional["PromptEmbeds"]:
        if d is None or isinstance(d, PromptEmbeds):
            return d
        if d.get("dtype") not in _FLOAT_DTYPES:
            raise ValueError(f"prompt_embeds dtype {d.get('dtype')!r} is not one of {_FLOAT_DTYPES}.")
        return cls(d["identifier"], d["data"], list(d["shape"]), d["dtype"])


def encode_prompt_embeds(value: Optional[PromptEmbeds]) -> Optional[dict]:
    return None if value is None else value.to_dict()


def decode_base64_tensor(text: str):
    """vLLM's completions ``prompt_embeds``: base64 of ``torch.save(tensor)``, read with
    ``weights_only=True`` (tensors and plain containers only). ValueError when it is not that."""
    import base64
    import binascii
    import io

    import torch

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("prompt_embeds must be base64 of torch.save(tensor) bytes; it is not valid "
                         "base64.") from None
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is the client's error
        raise ValueError(f"prompt_embeds could not be read as torch.save(tensor) bytes "
                         f"({type(exc).__name__}).") from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must hold one tensor, got {type(tensor).__name__}.")
    return tensor


def check_model_takes_embeds(model) -> None:
    """At start-up with ``enable_prompt_embeds``: the model must embed through ``embed_tokens``
    and take ``inputs_embeds`` in its forward (tessellm's decoder families do)."""
    import inspect

    name = type(model).__name__
    if getattr(model, "supports_images", False):
        raise ValueError(f"enable_prompt_embeds is not supported for the image-text model {name} "
                         "yet; use a text-only model.")
    takes = "inputs_embeds" in inspect.signature(model.forward).parameters
    if not takes or not hasattr(model, "embed_tokens"):
        raise ValueError(f"{name} does not take prompt embeddings (no inputs_embeds in its forward); "
                         "enable_prompt_embeds works with the Llama-family decoders.")


def step_embed_rows(states, counts: list[int], query_start_loc, device):
    """The step's rows at prompt positions of requests given as embeddings, and those rows'
    embeddings: ``(rows int64 [R], embeds [R, hidden])`` on ``device``, or None when the step
    has none. ``states`` / ``counts``: the step's requests in row order, before they advance::

        request rows (query_start_loc):  [ A A A A | B B B ]       A: embeds, 6-row prompt,
        A's positions this step:           4 5 6 7                  4 computed
        rows taking A's embeddings:        4 5   (positions 4, 5 < 6; 6, 7 are generated)
    """
    import torch

    rows, feats = [], []
    for i, (st, n) in enumerate(zip(states, counts)):
        if st.prompt_embeds is None:
            continue
        start = st.num_computed_tokens
        end = min(start + n, st.num_prompt_tokens)
        if start >= end:
            continue
        if not isinstance(st.prompt_embeds, torch.Tensor):  # first use: on the device, kept
            st.prompt_embeds = st.prompt_embeds.tensor(device)
        first = int(query_start_loc[i])
        rows.append(torch.arange(first, first + end - start, dtype=torch.int64))
        feats.append(st.prompt_embeds[start:end])
        if end == st.num_prompt_tokens:  # the prompt's last rows: the device copy can go (a
            st.prompt_embeds = None      # preempted request comes back with them: NewRequestData)
    if not rows:
        return None
    return torch.cat(rows).to(device), torch.cat(feats)


def embed_step(model, input_ids, embed_rows):
    """``inputs_embeds`` of a step: the token embeddings, the given rows replaced."""
    rows, feats = embed_rows
    embeds = model.embed_tokens(input_ids)
    embeds[rows] = feats.to(embeds.dtype)
    return embeds
