"""Bad input: specs a backend cannot run are refused clearly (None, ValueError or
NotImplementedError), never half-served; bad requests are rejected at the edge and the engine
keeps serving."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import AttentionSpec, GraphSpec, QuantSpec
from tessellm.testing.harness import greedy_tokens, make_paged_step, tolerance


def _ask(target, **fields):
    spec = AttentionSpec(**{**dict(num_heads=4, num_kv_heads=2, head_size=64,
                                   dtype=torch.float32, block_size=16), **fields})
    try:
        return target.registry.attention_kernel(target.backend, spec), None
    except (ValueError, NotImplementedError) as exc:
        assert str(exc).strip(), "a refusal must say why"
        return None, exc


def test_odd_head_size_is_refused_or_correct(target):
    kernel, _ = _ask(target, num_heads=2, num_kv_heads=1, head_size=24)
    if kernel is None:
        return
    step = make_paged_step([1, 5], [7, 0], num_kv_heads=1, group=2, head_size=24, block_size=16,
                           dtype=torch.float32, device=target.device)
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(step.batch), step.scale)
    torch.testing.assert_close(out.cpu(), step.ref_out, **tolerance(torch.float32))


def test_heads_not_multiple_of_kv_heads_fails_loudly(target):
    kernel, _ = _ask(target, num_heads=6, num_kv_heads=4)
    if kernel is None:
        return
    # Served anyway: then the first forward must raise, never return numbers.
    step = make_paged_step([1], [3], num_kv_heads=4, group=1, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device)
    q = torch.randn(1, 6, 64, device=target.device)
    with pytest.raises((RuntimeError, ValueError)):
        kernel.forward(q, step.k, step.v, step.k_cache, step.v_cache,
                       kernel.build_metadata(step.batch), step.scale)


def test_undeclared_kv_cache_dtype_is_refused(target):
    declared = target.backend.capabilities.get("kv_cache_dtypes")
    if declared is None or "fp8" in declared:
        pytest.skip(f"{target.name} does not declare kv_cache_dtypes without fp8")
    kernel, _ = _ask(target, kv_cache_dtype="fp8")
    assert kernel is None, "kv_cache_dtype='fp8' is not declared, so it must be refused"


def test_enforce_eager_means_no_graph_runner(target):
    spec = GraphSpec(max_num_seqs=4, enforce_eager=True)
    assert target.registry.graph_runner(target.backend, spec) is None


def test_unknown_quant_scheme_is_refused(target):
    assert target.registry.quant_method(target.backend, QuantSpec("bogus-4bit")) is None


def test_bad_requests_are_rejected_and_engine_keeps_serving(target, tiny_llama_dir):
    from tessellm import LLM

    # eager: the requests are refused before any step, and capturing graphs (the toy backend's
    # torch.compile, the cpu backend's compiled decode) was most of this test's time; the graphs
    # are test_graph.py's and test_generation.py's
    llm = LLM(tiny_llama_dir, device=target.name, emulate=target.emulated, dtype="float32",
              num_kv_blocks=32, max_model_len=128, max_num_seqs=4, enforce_eager=True)
    bad = [{"prompt_token_ids": [1, 100000]}, {"prompt_token_ids": [1] * 200},
           {"prompt_token_ids": []}, {"prompt_token_ids": [1, -3]}]
    for prompt in bad:
        with pytest.raises(ValueError):
            llm.generate([prompt], use_tqdm=False)
    assert len(greedy_tokens(llm, [[1, 2, 3], [4, 5]], 3)[1]) == 3
