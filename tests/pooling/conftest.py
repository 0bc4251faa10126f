"""Tiny random embedding models (built here, never downloaded) and the HF reference embedding:
``AutoModel``'s ``last_hidden_state`` (after the final norm), pooled one prompt at a time."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import TINY_COMMON


@pytest.fixture(scope="session")
def bare_model_dir(tmp_path_factory):
    """A function arch -> directory of a bare ``*Model`` checkpoint (no lm_head, no ``model.``
    prefix: how Qwen3-Embedding and e5-mistral ship), float32."""
    import torch
    from transformers import AutoModel, LlamaConfig, Qwen3Config

    configs = {"qwen3": Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False,
                                    use_sliding_window=False),
               "llama": LlamaConfig(**TINY_COMMON, tie_word_embeddings=False)}
    root = tmp_path_factory.mktemp("tiny-bare")
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            torch.manual_seed(4321)
            path = os.path.join(root, arch)
            AutoModel.from_config(configs[arch], dtype=torch.float32).save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


def with_sentence_transformers(src: str, dst: str, pooling_mode: str, normalize: bool) -> str:
    """A copy of ``src`` with sentence-transformers' modules.json and 1_Pooling/config.json."""
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(dst, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(dst, "1_Pooling"))
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
            "lasttoken": "pooling_mode_lasttoken"}
    st = {"word_embedding_dimension": TINY_COMMON["hidden_size"],
          **{k: k == keys[pooling_mode] for k in keys.values()}, "pooling_mode_max_tokens": False}
    with open(os.path.join(dst, "1_Pooling", "config.json"), "w") as f:
        json.dump(st, f)
    return dst


def hf_embeddings(model_dir: str, prompts: list[list[int]], pooling: str, normalize: bool = True,
                  dimensions: int | None = None):
    """The reference: HF AutoModel in float32, one prompt at a time (no padding)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            hidden = model(torch.tensor([p])).last_hidden_state[0]
            v = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
            if dimensions is not None:
                v = v[:dimensions]
            if normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out.append(v)
    return torch.stack(out)


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 90) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_COMMON["vocab_size"]) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tokenizer(path: str) -> None:
    """A small byte-level BPE tokenizer (ids < 300, inside the tiny vocabulary of 384) with a
    chat template, saved next to a tiny model so the server takes text and messages."""
    from tests.tiny_tokenizer import bpe_tokenizer

    corpus = ["the cat sat on the mat", "a query about embeddings and vectors",
              "The quick brown fox jumps over the lazy dog."]
    bpe_tokenizer(corpus * 20, ["<pad>", "<s>", "</s>"], 300, CHAT_TEMPLATE, bos_token="<s>",
                  eos_token="</s>", pad_token="<pad>").save_pretrained(path)


@pytest.fixture(scope="session")
def embedding_model_dir(bare_model_dir, tmp_path_factory):
    """A bare Qwen3Model checkpoint with a tokenizer: what a Qwen3-Embedding directory holds."""
    path = str(tmp_path_factory.mktemp("tiny-embed") / "qwen3-embed")
    shutil.copytree(bare_model_dir("qwen3"), path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A function (arch, num_labels) -> directory of a tiny random HF ``*ForSequenceClassification``
    (float32 safetensors, named labels, the tokenizer above)."""
    import torch
    from transformers import (LlamaConfig, LlamaForSequenceClassification, Qwen2Config,
                              Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification)

    families = {"llama": (LlamaConfig, LlamaForSequenceClassification, {"tie_word_embeddings": False}),
                "qwen2": (Qwen2Config, Qwen2ForSequenceClassification, {"use_sliding_window": False}),
                "qwen3": (Qwen3Config, Qwen3ForSequenceClassification,
                          {"head_dim": 32, "use_sliding_window": False})}
    root = tmp_path_factory.mktemp("tiny-cls")
    made: dict = {}

    def make(arch: str, num_labels: int) -> str:
        if (arch, num_labels) not in made:
            config_cls, model_cls, extra = families[arch]
            labels = {i: f"class_{chr(97 + i)}" for i in range(num_labels)}
            config = config_cls(**TINY_COMMON, **extra, num_labels=num_labels, id2label=labels,
                                label2id={v: k for k, v in labels.items()})
            torch.manual_seed(97 + num_labels)
            model = model_cls(config).to(torch.float32)
            with torch.no_grad():  # HF initialises score with std 0.02: make the logits differ visibly
                model.score.weight.normal_(0, 1.0)
            path = os.path.join(root, f"{arch}-{num_labels}")
            model.save_pretrained(path)
            save_tokenizer(path)
            made[(arch, num_labels)] = path
        return made[(arch, num_labels)]

    return make


def hf_logits(model_dir: str, prompts: list[list[int]]):
    """The reference: HF ``*ForSequenceClassification`` in float32, one prompt at a time (no
    padding: the pooled token is the last)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0] for p in prompts])
