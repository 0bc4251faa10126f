"""``prompt_embeds`` under tensor parallelism on the CPU (two gloo ranks in worker processes):
the embeddings reach both ranks in the step's msgpack message (tessellm.distributed.codec) and
give HF ``generate(inputs_embeds=...)``'s greedy tokens, chunked over steps."""

from __future__ import annotations

import torch

from tessellm import LLM, SamplingParams


def test_tp2_prompt_embeds_match_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama-sharp")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = [list(range(3, 33)), [7, 8, 9]]
    with torch.no_grad():
        embeds = [hf.get_input_embeddings()(torch.tensor(p)) + 0.3 * torch.randn(len(p), 64, generator=gen)
                  for p in prompts]
        expected = [hf.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[0].tolist()
                    for e in embeds]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(path, device="cpu", num_kv_blocks=64, tensor_parallel_size=2, max_num_batched_tokens=16,
             enable_prompt_embeds=True) as llm:
        outs = llm.generate([{"prompt_embeds": e} for e in embeds], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
