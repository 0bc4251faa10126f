"""Random PEFT LoRA adapters for the tiny test models, made with ``peft`` (never downloaded)."""

from __future__ import annotations

import os

# name -> (rank, target modules, extra LoraConfig arguments)
ADAPTERS = {
    "qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
    "kogate16": (16, ["k_proj", "o_proj", "gate_proj"], dict(lora_alpha=8, use_rslora=True)),
    "all32": (32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              dict(lora_alpha=64)),
}


def make_adapters(model_dir: str, root: str, seed: int = 0, specs=None) -> dict[str, str]:
    """Save each adapter of ``specs`` (default ``ADAPTERS``) for the model in ``model_dir``
    under ``root``; B is random too (``init_lora_weights=False``), so every adapter changes
    the tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, (rank, targets, extra)) in enumerate((specs or ADAPTERS).items()):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, target_modules=targets, init_lora_weights=False,
                            lora_dropout=0.0, **extra)
        model = get_peft_model(base, config)
        path = os.path.join(root, name)
        model.save_pretrained(path)
        paths[name] = path
    return paths


def peft_greedy(model_dir: str, adapter_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens of HF transformers with one adapter applied (None: the base model), EOS
    allowed and not stopping, as our ignore_eos (tests/models/test_hf_greedy_reference.py)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: EOS may be chosen, never stops
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def mixed_batch(model_dir: str, paths: dict, prompts: list[list[int]], names: list,
                max_new: int, **engine) -> tuple[list, list]:
    """Every prompt with every adapter of ``names`` (None: no adapter), shuffled into one
    ``generate`` of one engine (float32, greedy, two slots of rank 16; ``engine`` overrides):
    ``([(prompt index, name)], [token ids])``, one entry a request."""
    import random

    from tessellm import LLM, SamplingParams
    from tessellm.lora import LoRARequest

    loras = {n: LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(n for n in names if n)}
    jobs = [(p, n) for n in names for p in range(len(prompts))]
    random.Random(1).shuffle(jobs)
    llm = LLM(model_dir, dtype="float32", enable_lora=True,
              **{"max_lora_rank": 16, "max_loras": 2, **engine})
    try:
        outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs],
                            SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True),
                            use_tqdm=False, lora_request=[loras.get(n) for _, n in jobs])
    finally:
        llm.shutdown()
    return jobs, [o.outputs[0].token_ids for o in outs]


def base_shapes(model_dir: str):
    """The LoRA layout (``tessellm.lora.shapes.BaseShapes``) of the model saved in ``model_dir``."""
    from transformers import AutoConfig

    from tessellm.lora.shapes import BaseShapes

    return BaseShapes.from_config(AutoConfig.from_pretrained(model_dir))


def adapter_models(tmp_path_factory, save, specs: dict, seed: int):
    """A getter ``family -> (model dir, {adapter name: dir})``, each family built once: the tiny
    model ``save(family, path)`` writes and its adapters ``specs[family]`` (``make_adapters``)."""
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(f"lora-{family}")
            model = save(family, str(root / "model"))
            made[family] = model, make_adapters(model, str(root), seed=seed, specs=specs[family])
        return made[family]

    return get


def assert_mixed_batch_matches_peft(model_dir: str, paths: dict, prompts: list[list[int]],
                                    names: list, max_new: int, family: str) -> None:
    """``mixed_batch``'s tokens equal HF+peft's with each adapter of ``names`` applied alone
    (None: the base model), and each adapter changes some prompt's tokens (the case can fail)."""
    want = {n: peft_greedy(model_dir, paths[n] if n else None, prompts, max_new) for n in names}
    for name in names[1:]:
        assert want[name] != want[None], name
    jobs, got = mixed_batch(model_dir, paths, prompts, names, max_new)
    for (p, name), tokens in zip(jobs, got):
        assert tokens == want[name][p], (family, name, p)


MODULE_GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_random_adapter(path: str, model_dir: str, rank: int, targets, alpha: float,
                         seed: int) -> None:
    """A PEFT adapter written with safetensors alone (no peft: the GPU image lacks it)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head = getattr(config, "head_dim", None) or hidden // heads
    kv = config.num_key_value_heads * head
    shapes = {"q_proj": (hidden, heads * head), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head, hidden), "gate_proj": (hidden, config.intermediate_size),
              "up_proj": (hidden, config.intermediate_size),
              "down_proj": (config.intermediate_size, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{MODULE_GROUPS[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.1
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                   "bias": "none", "use_dora": False}, f)


def merged_greedy(model_dir: str, adapter_dir, prompts, max_new: int, device: str, dtype) -> list:
    """Greedy tokens of HF transformers with the adapter merged into the weights
    (``W + alpha / r * B A``, in float32 before the cast), no peft needed."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
        tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        params = dict(model.named_parameters())
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            params[name].data += (config["lora_alpha"] / a.shape[0]) * (b.float() @ a.float())
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: EOS may be chosen, never stops
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def add_byte_tokenizer(model_dir: str) -> None:
    """Save a small byte-level BPE tokenizer (ids 0-2: pad, bos, eos, as the tiny Llama's
    config; a one-line chat template) into ``model_dir``, trained here on JSON-like text, so
    structured output and chat (which need a tokenizer) run on the tiny models."""
    from tests.tiny_tokenizer import bpe_tokenizer

    corpus = ['{"name": "abc", "age": 12, "tags": ["x", "y"], "ok": true}',
              "The answer is yes or no.", "hello world 0123456789"]
    bpe_tokenizer(corpus * 20, ["<pad>", "<s>", "</s>"], 384, CHAT_TEMPLATE, bos_token="<s>",
                  eos_token="</s>", pad_token="<pad>").save_pretrained(model_dir)


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """A copy of the checkpoint in ``model_dir`` (config, tokenizer) with the PEFT adapter
    merged into its weights (``W + scaling * B A`` in float32): the reference model for a
    request with that adapter."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    lora = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        scaling = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
        name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        weights[name] = (weights[name].float() + scaling * (b.float() @ a.float())).contiguous()
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
