"""fp8 latent rows (``kv_cache_dtype='fp8'``) with multi-head latent attention (DeepSeek-V2/V3's
latent KV cache): the cache is float8 e4m3 of ``row / k_scale`` (one scale per cache,
``backends/reference/mla_attention.py``), on the backends whose MLA kernel lists fp8; refused
with one sentence naming the option, MLA, the backend and the backends that can elsewhere.

How close fp8 comes to the float32 cache, measured on these tiny random models (teacher-forced
on the float32 engine's greedy continuation, 4 prompts x 16 tokens, V2-Lite and V3 shapes): the
mean |log-probability difference| of the chosen tokens is about 0.1 (0.07-0.24 a prompt; the
whole model in bfloat16 gives about 0.03), the largest 0.5-2.2 at near-ties, and the float32
engine's token is fp8's top token at 12-16 of 16 positions. Free-running greedy decoding
therefore parts from float32 after a few tokens on these models (a 128-token vocabulary of
random logits with many near-ties); the test asserts the teacher-forced bounds below."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.quantization.support import UnsupportedQuantizationError
from tests.models.test_deepseek import deepseek_config, save_deepseek
from tests.models.variant_parity import ours, prompts


def test_fp8_kv_cache_refused_where_the_mla_kernel_lacks_it(tmp_path):
    config = deepseek_config(True, q_lora_rank=24)
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedQuantizationError,
                       match=r"kv_cache_dtype='fp8' is not supported with multi-head latent "
                             r"attention .* on backend 'xpu'.* use kv_cache_dtype='auto', or a "
                             r"backend that supports it: cpu, cuda, rocm"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32", kv_cache_dtype="fp8",
            device="xpu", emulate=True)


@pytest.mark.parametrize("v3, overrides", [(False, {}), (True, dict(q_lora_rank=24))],
                         ids=["v2-lite", "v3-qlora"])
def test_fp8_latent_rows_close_to_float32(v3, overrides, tmp_path):
    path = save_deepseek(deepseek_config(v3, **overrides), str(tmp_path / "ds"))
    batch = prompts((3, 17, 40, 25))
    tokens, want = ours(path, batch, 16)
    full = [p + t for p, t in zip(batch, tokens)]
    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, ignore_eos=True)
    with LLM(path, dtype="float32", kv_cache_dtype="fp8") as llm:
        layer = llm.engine.core.runner.model.layers[0].self_attn.attn
        assert layer.k_cache.dtype == torch.float8_e4m3fn
        outs = llm.generate([{"prompt_token_ids": f} for f in full], score, use_tqdm=False)
    diffs, agree = [], 0
    for o, f, ref in zip(outs, full, want):
        got = torch.tensor([o.prompt_logprobs[i][f[i]].logprob for i in range(1, len(f))])
        diffs.append((got - ref).abs())
        for i in range(len(f) - 16, len(f)):
            agree += max(o.prompt_logprobs[i].items(), key=lambda kv: kv[1].logprob)[0] == f[i]
    diff = torch.cat(diffs)
    assert diff.max() > 1e-3, "fp8 rows gave float32's log-probabilities: not fp8"
    assert diff.mean() < 0.2, f"mean |log-prob difference| {diff.mean():.3f}"
    assert agree >= 0.75 * 16 * len(batch), f"float32's token on top at {agree} of 64"
