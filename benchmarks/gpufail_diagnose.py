"""One GPU run that says which side is off in two H100 failures of session 26 whose cause the
CPU cannot show (``python benchmarks/gpufail_diagnose.py [gemma2] [fp8head]``, from the repo
root, on a CUDA GPU; prints plain lines, no assertion):

- ``test_fp32_greedy_matches_hf_on_cuda[gemma2]``: tessellm's fp32 greedy parted from HF's with
  HF's logit gap 0.024. On the CPU HF's ``generate``, HF's full-forward greedy and tessellm
  agree on every token. Here: HF's attention implementation; ``generate`` against the
  full-forward greedy (does HF's cached decode part from its own forward?); tessellm with CUDA
  graphs, eager, and eager with the attention dots in "ieee" fp32 instead of "tf32x3"; at each
  parting, HF's logits of both tokens and tessellm's own logprobs of both.
- ``test_fp8_lm_head_logits[llama]`` (untied head; the tied one passed): every head call's
  logits against the W8A16 oracle, the largest error over the test's tolerance, and the same
  x through ``fp8_w8a16`` with the packed bf16x2 GEMV on and off and through a torch model of
  that GEMV's arithmetic (pairs rounded to bf16, float32 sum).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.getcwd())


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def gemma2() -> None:
    from transformers import AutoModelForCausalLM

    from tessellm import LLM, SamplingParams
    from tessellm.kernels.attention import decode, prefill
    from tests.conftest import hf_greedy
    from tests.models.test_cuda_families import _prompts, _save

    path = _save("gemma2", "/tmp/gpufail-gemma2")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda")
    print("gemma2: HF attn_implementation", hf.config._attn_implementation,
          "| tf32 matmul", torch.backends.cuda.matmul.allow_tf32)
    gen = hf_greedy(path, _prompts(), 32, device="cuda")
    full = []
    for p in _prompts():
        ids = list(p)
        with torch.no_grad():
            for _ in range(32):
                ids.append(int(hf(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
        full.append(ids[len(p):])
    print("gemma2: HF generate == HF full-forward greedy:", gen == full,
          [_first_diff(a, b) for a, b in zip(gen, full)])

    def run(label, **kw):
        llm = LLM(path, device="cuda", dtype="float32", max_model_len=512,
                  gpu_memory_utilization=0.3, **kw)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                                SamplingParams(max_tokens=32, temperature=0, ignore_eos=True,
                                               logprobs=5), use_tqdm=False)
        finally:
            llm.shutdown()
        for p, o, want in zip(_prompts(), outs, full):
            got = list(o.outputs[0].token_ids)
            i = _first_diff(got, want)
            if i is None:
                print(f"gemma2 {label}: prompt {len(p)}: equal to HF full-forward")
                continue
            with torch.no_grad():
                lg = hf(torch.tensor([p + want[:i]], device="cuda")).logits[0, -1].float()
            lp = o.outputs[0].logprobs[i]
            ours = {t: round(v.logprob, 5) for t, v in lp.items()}
            print(f"gemma2 {label}: prompt {len(p)} parts at {i}: ours {got[i]} HF {want[i]}; HF "
                  f"logits {float(lg[got[i]]):.5f} / {float(lg[want[i]]):.5f}; our top "
                  f"logprobs {ours}")

    run("graphs")
    run("eager", enforce_eager=True)
    saved = prefill._dot_precision, decode._dot_precision
    ieee = lambda dtype: "ieee" if dtype == torch.float32 else "tf32"  # noqa: E731
    prefill._dot_precision = decode._dot_precision = ieee
    try:
        run("eager+ieee", enforce_eager=True)
    finally:
        prefill._dot_precision, decode._dot_precision = saved


def fp8head() -> None:
    from tessellm import LLM, SamplingParams
    from tessellm.kernels.gemm import weight_only
    from tessellm.layers.vocab import ParallelLMHead
    from tests.conftest import _tiny_configs
    from transformers import AutoModelForCausalLM

    os.environ["TESSELLM_FP8_LM_HEAD"] = "1"
    for arch in ("llama", "llama-tied"):
        torch.manual_seed(1234)
        path = f"/tmp/gpufail-{arch}"
        AutoModelForCausalLM.from_config(_tiny_configs()[arch],
                                         dtype=torch.float32).save_pretrained(path)
        llm = LLM(path, quantization="fp8", device="cuda", dtype="bfloat16", max_model_len=128,
                  num_kv_blocks=32, max_num_seqs=2, enforce_eager=True)
        head = next(m for m in llm.engine.core.runner.model.modules()
                    if isinstance(m, ParallelLMHead))
        dense = (head.tied if head.tied is not None else head.weight).detach()
        seg = head.quant_weight
        seen = []
        hook = head.register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), o.clone())))
        llm.generate([{"prompt_token_ids": [(5 * j + 3) % 384 for j in range(9)]}],
                     SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1),
                     use_tqdm=False)
        hook.remove()
        codes = seg.qweight.double()
        scales = seg.scales.double()
        print(f"fp8head {arch}: dense {tuple(dense.shape)} {dense.dtype} stride {dense.stride()}"
              f" | qweight stride {seg.qweight.stride()} | x2 GEMV "
              f"{weight_only._use_gemv_x2(seen[-1][0], seg.qweight)}")
        for x, out in seen:
            ref = (x.double() @ codes.t()) * scales[None, :]
            dref = x.double() @ dense.double().t()
            tol = 2e-3 + 2e-2 * ref.abs()
            near_any = ((out.double() - ref).abs() <= tol) | ((out.double() - dref).abs()
                                                               <= 2e-3 + 2e-2 * dref.abs())
            print(f"  call rows {x.shape[0]} x stride {x.stride()} contiguous "
                  f"{x.is_contiguous()}: engine out err/tol max "
                  f"{float(((out.double() - ref).abs() / tol).max()):.3f}, near neither "
                  f"{int((~near_any).sum())}")
            if x.shape[0] > 2:
                continue
            for on in (True, False):
                weight_only.FP8_GEMV_X2 = on
                got = weight_only.fp8_w8a16(x, seg.qweight, seg.scales).double()
                print(f"    fp8_w8a16 x2={on}: err/tol max {float(((got - ref).abs() / tol).max()):.3f}")
            weight_only.FP8_GEMV_X2 = True
            xd = x.double()
            bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
            lane = bf(bf(xd[:, None, 0::2] * codes[None, :, 0::2]) + xd[:, None, 1::2]
                      * codes[None, :, 1::2])
            model = bf(lane.float().sum(-1).double() * scales[None, :])
            print(f"    torch model of the x2 arithmetic: err/tol max "
                  f"{float(((model - ref).abs() / tol).max()):.3f}")
        llm.shutdown()


if __name__ == "__main__":
    which = sys.argv[1:] or ["gemma2", "fp8head"]
    for name in which:
        {"gemma2": gemma2, "fp8head": fp8head}[name]()
