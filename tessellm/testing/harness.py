"""What the conformance tests share: the target backend, random paged batches with their
reference results, tolerances, and a tiny random Llama."""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.backends.reference.attention import paged_attention, write_kv_cache
from tessellm.backends.spec import AttentionBatch


@dataclass
class ConformanceTarget:
    name: str
    backend: object  # tessellm.backends.spec.Backend
    registry: object  # tessellm.backends.registry.BackendRegistry
    device: torch.device  # where test tensors live
    emulated: bool  # True: the backend's device is absent; tensors are on the CPU

    @classmethod
    def resolve(cls, name: str, emulate: bool) -> "ConformanceTarget":
        from tessellm.backends.registry import get_registry

        registry = get_registry()
        if name not in registry.backends:
            raise ValueError(f"no backend {name!r} is registered (registered: "
                             f"{', '.join(sorted(registry.backends))}); is its plugin installed?")
        backend = registry.backends[name]
        if _available(backend):
            return cls(name, backend, registry, backend.torch_device(), False)
        if not emulate:
            raise ValueError(f"backend {name!r} is not available on this machine; pass "
                             "--emulate to run its kernels on CPU tensors.")
        emulated = registry.select(name, emulate=True)  # host tensors (tessellm.backends.emulation)
        return cls(name, emulated, registry, emulated.torch_device(), True)

    @property
    def low_precision_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def skip_if_emulated(self, what: str) -> None:
        import pytest

        if self.emulated:
            pytest.skip(f"{what} needs the {self.name} device (running emulated on CPU)")


def _available(backend) -> bool:
    try:
        return bool(backend.is_available())
    except Exception:  # noqa: BLE001
        return False


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def tolerance(dtype) -> dict:
    return {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


@dataclass
class PagedStep:
    """One step's inputs on the target device, plus the reference's result for them."""

    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, KVH, D]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D], context already written
    v_cache: torch.Tensor
    batch: AttentionBatch
    scale: float
    ref_out: torch.Tensor  # reference attention output (CPU)
    ref_k_cache: torch.Tensor  # reference caches after this step's write (CPU)
    ref_v_cache: torch.Tensor
    sinks: Optional[torch.Tensor] = None  # float32 [H] attention sinks on the device, or None


def make_paged_step(query_lens: list[int], ctx_lens: list[int], *, num_kv_heads: int, group: int,
                    head_size: int, block_size: int, dtype, device, window: Optional[int] = None,
                    seed: int = 0, logit_softcap: Optional[float] = None,
                    q_gain: float = 1.0, sinks: Optional[torch.Tensor] = None,
                    key_limits: Optional[list[int]] = None) -> PagedStep:
    """A random step: decodes first (query length 1), then prefill chunks over cached context.

    Each sequence owns ``cdiv(seq_len, block_size)`` blocks drawn from a shuffled pool larger
    than needed, so neighbours are not adjacent and unused blocks exist (they must stay
    untouched). The reference runs on the CPU in float32. ``q_gain`` scales the queries (larger
    scores: a soft-cap test's cap then changes every row). ``sinks``: float32 ``[H]``
    attention sinks for the reference and the kernel (``PagedStep.sinks``). ``key_limits``:
    per query row, the last key position it sees (``AttentionBatch.key_limits``).
    """
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    nblocks = [math.ceil(s / block_size) for s in seq_lens]
    pool = torch.randperm(sum(nblocks) + 3, generator=gen)
    tables = torch.zeros(len(seq_lens), max(nblocks) + 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = pool[used:used + n]
        used += n
    num_blocks = len(pool)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots, starts = [], [0]
    for s, (c, n) in enumerate(zip(ctx_lens, query_lens)):
        for p in range(c, c + n):
            slots.append(int(tables[s, p // block_size]) * block_size + p % block_size)
        starts.append(starts[-1] + n)
    T = starts[-1]
    q = (torch.randn(T, num_heads, head_size, generator=gen) * q_gain).to(dtype)
    k = torch.randn(T, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(T, num_kv_heads, head_size, generator=gen).to(dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    qsl = torch.tensor(starts, dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_size ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, ref_k, ref_v, slot_mapping)
    limits = None if key_limits is None else torch.tensor(key_limits, dtype=torch.int32)
    ref_out = paged_attention(q.float(), ref_k.float(), ref_v.float(), qsl, sl, tables, scale, window,
                              logit_softcap, sinks, limits)
    num_decodes = 0
    for n in query_lens:
        if n != 1:
            break
        num_decodes += 1
    batch = AttentionBatch(
        num_tokens=T, num_seqs=len(seq_lens), num_decodes=num_decodes,
        query_start_loc=qsl.to(device), seq_lens=sl.to(device), block_tables=tables.to(device),
        slot_mapping=slot_mapping.to(device), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc_host=starts, seq_lens_host=seq_lens,
        key_limits=None if limits is None else limits.to(device),
        key_limits_host=None if key_limits is None else list(key_limits))
    return PagedStep(q.to(device), k.to(device), v.to(device), k_cache.to(device),
                     v_cache.to(device), batch, scale, ref_out, ref_k, ref_v,
                     None if sinks is None else sinks.float().to(device))


def rotate_step(step: PagedStep, positions: torch.Tensor, cos_sin: torch.Tensor):
    """What a kernel fusing rotary and the cache write (``fuses_rotary``) must match on ``step``:
    q and k rotated at ``positions`` by the reference's NeoX rotation, the rotated k and v written
    into copies of the step's caches: ``(q_rot [T, H, D], k_cache, v_cache)``, on the CPU."""
    from tessellm.backends.reference.ops import ReferenceOps

    t, _, head_size = step.q.shape
    q_rot, k_rot = ReferenceOps().rotary_embedding(positions, step.q.cpu().reshape(t, -1).clone(),
                                                   step.k.cpu().reshape(t, -1).clone(), cos_sin,
                                                   head_size)
    k_cache, v_cache = step.k_cache.cpu().clone(), step.v_cache.cpu().clone()
    write_kv_cache(k_rot.view_as(step.k.cpu()), step.v.cpu(), k_cache, v_cache,
                   step.batch.slot_mapping.cpu())
    return q_rot.view(t, -1, head_size), k_cache, v_cache


TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)


def save_tiny_llama(root: str, seed: int = 1234) -> str:
    """Build a random Llama from an HF config (head size 16) and save it as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tessellm.loader.transformers_classes import dtype_kwargs

    path = os.path.join(root, "tiny-llama")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA), **dtype_kwargs(torch.float32))
        model.save_pretrained(path)
    return path


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from tessellm.core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
