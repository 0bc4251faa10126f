"""On a CUDA GPU: the decode micro-batch overlap (``enable_decode_overlap``) with its two
streams gives HF's greedy tokens in float32: pure-decode halves in captured graphs and in eager
steps, and mixed steps (a 64-token budget: decodes | prefill chunks, eager) with the GEMMs' SM
carve-out (bf16 at Llama-3.1-8B shapes: ``benchmarks/decode_overlap_step.py`` compares the
logits, ``benchmarks/tbo_step.py`` times the steps)."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 40 prompts: decode batches up to 40 rows (graph size 40, micro-batches of 20)
PROMPTS = [[(7 * i + 3 * j) % 384 for j in range(5 + (i * 13) % 70)] for i in range(40)]
MAX_NEW = 12
ON = dict(enable_decode_overlap=True, decode_overlap_steps="all", decode_overlap_min_batch=2,
          decode_overlap_min_prefill=8)


def _generate(path: str, enforce_eager: bool, **kwargs):
    """Greedy tokens of one engine (its KV cache kept small: two engines in turn), the name
    of its overlap streams (None: off), the (decode rows, tokens) of the steps it split while
    serving, and of those it split while capturing graphs."""
    from tessellm.core.decode_overlap import DecodeOverlap

    seen, captured = [], []
    split = DecodeOverlap.split
    serving = False

    def recorded(self, batch, model):  # the real split, its result noted
        out = split(self, batch, model)
        if out is not None:
            (seen if serving else captured).append((batch.num_decodes, batch.num_tokens))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DecodeOverlap, "split", recorded)
        llm = LLM(path, device="cuda", dtype="float32", enforce_eager=enforce_eager,
                  num_kv_blocks=1024, **kwargs)
        runner = llm.engine.core.runner
        assert (runner.graph_runner is None) == enforce_eager
        overlap = runner.overlap
        assert (overlap is not None) == bool(kwargs.get("enable_decode_overlap"))
        serving = True
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True),
                            use_tqdm=False)
    streams = None if overlap is None else type(overlap.streams).__name__
    scoped = overlap is not None and overlap.gemm_scope is not None
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], streams, seen, captured, scoped


@pytest.mark.parametrize("enforce_eager,budget,carveout", [(False, None, None), (True, None, None),
                                                           (False, 64, 16)])
def test_fp32_split_decode_matches_hf(tiny_model_dir, enforce_eager, budget, carveout):
    path = tiny_model_dir("llama-sharp")
    want = hf_greedy(path, PROMPTS, MAX_NEW, device="cuda")
    off, *_ = _generate(path, enforce_eager, max_num_batched_tokens=budget)
    on, streams, seen, captured, scoped = _generate(
        path, enforce_eager, max_num_batched_tokens=budget, decode_overlap_sm_carveout=carveout, **ON)
    assert streams == "CudaOverlapStreams" and scoped == (carveout is not None)
    if not enforce_eager:  # decode steps replay graphs split at capture; eager steps split live
        assert captured and all(d == n for d, n in captured), "no decode graph was split"
        assert budget is None or any(d < n for d, n in seen), "no mixed step was split"
    else:
        assert seen and all(d == n for d, n in seen)
    assert on == want, ("the split path parts from HF; the unsplit path "
                        + ("does not" if off == want else "does too (a near-tie?)"))
    assert on == off


def test_carveout_scope_sets_and_restores():
    """The cuda streams' carve-out scope: cuBLASLt and the SM carve-out inside, the settings
    before it after; a carve-out leaving no SM is refused when the scope is made."""
    from tessellm.backends.cuda.streams import overlap_streams

    streams = overlap_streams()
    if streams.gemm_sm_carveout is None:
        pytest.skip("this torch has no cuBLAS SM carve-out")
    library = torch.backends.cuda.preferred_blas_library()
    before = torch._C._get_sm_carveout_experimental()
    a = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    with streams.gemm_sm_carveout(32):
        assert torch._C._get_sm_carveout_experimental() == 32
        assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt
        inside = a @ b
    assert torch._C._get_sm_carveout_experimental() == before
    assert torch.backends.cuda.preferred_blas_library() == library
    torch.testing.assert_close(inside.float(), (a @ b).float(), rtol=2e-2, atol=2e-2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match="decode_overlap_sm_carveout"):
        streams.gemm_sm_carveout(sms)


def test_graph_capture_caches_the_side_streams_segments_again():
    """torch's CUDA graph context empties the caching allocator: the side stream's wholly free
    segments (an eager split step's, the memory profile's among them) are cached again after
    the captures, on that stream, as the current stream's are (``graph_runner.kept_segments``)."""
    from tessellm.backends.cuda.graph_runner import CudaGraphRunner, cached_segments
    from tessellm.backends.cuda.streams import overlap_streams

    streams = overlap_streams()
    with streams.side(streams.record()):
        block = torch.ones(48 << 20, dtype=torch.uint8, device="cuda")
        done = streams.record()
    streams.wait(done)
    torch.cuda.synchronize()
    del block
    before = sorted(cached_segments(streams.stream))
    assert before  # (a pooled stream may hold segments of an earlier test's too)
    CudaGraphRunner([1, 2]).capture(lambda x: x * 2, lambda n: (torch.zeros(n, device="cuda"),))
    assert sorted(cached_segments(streams.stream)) == before
