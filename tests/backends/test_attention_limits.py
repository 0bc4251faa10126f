"""The engine's limits reach the attention kernels (``AttentionSpec.max_model_len`` /
``max_num_seqs``): the cuda plugin's Triton kernel sizes its decode workspace from them, not
from a guess; a spec without them (a kernel built outside an engine) keeps the old defaults."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import AttentionSpec

ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=16, max_model_len=64, max_num_seqs=3)


def _spec(**limits) -> AttentionSpec:
    return AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, **limits)


def _workspace_bytes(kernel) -> int:
    """The decode workspace ``_get_workspace`` allocates once (every decode and verify batch)."""
    q_max = kernel._max_verify_query_len()
    return 4 * max(kernel.workspace_numel(n, q) for q in range(1, q_max + 1)
                   for n in range(1, kernel.max_num_seqs // q + 1))


def test_cuda_plugin_sizes_the_kernel_from_the_spec():
    from types import SimpleNamespace

    from tessellm.backends.cuda.plugin import tessellm_attention_kernel

    backend = SimpleNamespace(name="cuda")  # the hook reads the name only
    sized = tessellm_attention_kernel(backend, _spec(max_model_len=256, max_num_seqs=8))
    assert (sized.max_model_len, sized.max_num_seqs) == (256, 8)
    guessed = tessellm_attention_kernel(backend, _spec())
    assert (guessed.max_model_len, guessed.max_num_seqs) == (131072, 1024)
    assert _workspace_bytes(sized) < _workspace_bytes(guessed)


@pytest.mark.interpreted  # the emulated cuda backend (its Triton kernels on host tensors)
def test_engine_gives_its_limits_to_the_target_kernel(tiny_llama):
    from tessellm import LLM

    with LLM(tiny_llama, device="cuda", emulate=True, **ENGINE) as llm:
        kernel = llm.engine.core.runner.kernel
        assert (kernel.spec.max_model_len, kernel.spec.max_num_seqs) == (64, 3)
        assert (kernel.max_model_len, kernel.max_num_seqs) == (64, 3)


def test_verify_steps_widen_the_rows():
    """With speculative decoding the captured verify steps have S * q rows of equal query length:
    the kernel takes them as such a step (``verify_query_len``) when the rows fit its limit."""
    from tessellm.config import EngineArgs
    from tessellm.distributed.worker import attention_rows

    args = EngineArgs(model="unused", max_num_seqs=3)
    assert attention_rows(args) == 3
    args.speculative_config = {"method": "ngram", "num_speculative_tokens": 3}
    assert attention_rows(args) == 2 * 4  # verify buckets up to 2 sequences (of 3), q = 4
    args.max_num_seqs = 256
    assert attention_rows(args) == 256  # 32 sequences * 4 rows fit


def test_rows_widen_only_where_verify_steps_may_be_captured(tmp_path):
    """Eager verify steps take the prefill kernel: the rows stay the scheduler's where no
    verify step is captured (the decode step not captured: enforce_eager, an emulated backend,
    pooling, pipeline stages; or a drafter that reads the step's tensors, whose verify steps
    run eagerly), so the kernel's decode workspace is not sized for rows that never come."""
    from tessellm.config import EngineArgs
    from tessellm.distributed.worker import attention_rows

    args = EngineArgs(model="unused", max_num_seqs=3,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert attention_rows(args, graphs=True) == 8
    assert attention_rows(args, graphs=False) == 3
    for method in ("eagle", "eagle3"):
        args.speculative_config = {"method": method, "num_speculative_tokens": 3,
                                   "model": str(tmp_path)}
        assert attention_rows(args, graphs=True) == 3
    args.speculative_config = {"method": "draft_model", "num_speculative_tokens": 3,
                               "model": str(tmp_path)}
    assert attention_rows(args, graphs=True) == 8


def test_an_eager_engine_keeps_the_schedulers_rows(tiny_llama):
    from tessellm import LLM

    spec = {"method": "ngram", "num_speculative_tokens": 3}
    with LLM(tiny_llama, device="cpu", enforce_eager=True, speculative_config=spec,
             **ENGINE) as llm:
        runner = llm.engine.core.runner
        assert runner.verify_graphs is None
        assert runner.kernel.spec.max_num_seqs == 3
