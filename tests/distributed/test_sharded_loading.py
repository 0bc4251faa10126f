"""Tensor-parallel sharded loading: each rank's parameters are exactly its slices of the full
checkpoint tensors, and the pieces cover the whole (built in-process: layers take their
tensor-parallel rank as an argument and need no process group to load)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tessellm.backends.registry import get_registry
from tessellm.config import resolve_model
from tessellm.distributed.parallel_state import PipelineStage, TensorParallel
from tessellm.loader.model_loader import build_model


def _build(model_dir: str, tp: TensorParallel, pp: PipelineStage = None):
    registry = get_registry()
    backend = registry.select("cpu")
    model, _ = build_model(resolve_model(model_dir), "safetensors", registry, backend, torch.float32,
                           torch.device("cpu"), 16, tp=tp, pp=pp)
    return model


def _full(model_dir: str) -> dict[str, torch.Tensor]:
    import glob

    tensors = {}
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        tensors.update({k.removeprefix("model."): v for k, v in load_file(path).items()})
    return tensors


@pytest.mark.parametrize("tp_size", [2, 4])
def test_rank_slices_equal_full_tensor_slices(tiny_model_dir, tp_size):
    # 4 query heads, 2 KV heads, head size 16: at T=4 each KV head lives on two ranks.
    path = tiny_model_dir("qwen2")  # qkv bias too
    full = _full(path)
    hd, kv_heads = 16, 2
    for rank in range(tp_size):
        model = _build(path, TensorParallel(rank, tp_size))
        attn = model.layers[1].self_attn
        q_rows = 64 // tp_size
        kv_head = rank * kv_heads // tp_size
        for part, offset in (("weight", None), ("bias", None)):
            got = getattr(attn.qkv_proj, part).data
            q = full[f"layers.1.self_attn.q_proj.{part}"][rank * q_rows:(rank + 1) * q_rows]
            k = full[f"layers.1.self_attn.k_proj.{part}"][kv_head * hd:(kv_head + 1) * hd]
            v = full[f"layers.1.self_attn.v_proj.{part}"][kv_head * hd:(kv_head + 1) * hd]
            assert torch.equal(got, torch.cat([q, k, v])), (rank, part)
        cols = slice(rank * q_rows, (rank + 1) * q_rows)
        assert torch.equal(attn.o_proj.weight.data, full["layers.1.self_attn.o_proj.weight"][:, cols])
        inter = 128 // tp_size
        rows = slice(rank * inter, (rank + 1) * inter)
        mlp = model.layers[0].mlp
        assert torch.equal(mlp.gate_up_proj.weight.data,
                           torch.cat([full["layers.0.mlp.gate_proj.weight"][rows],
                                      full["layers.0.mlp.up_proj.weight"][rows]]))
        assert torch.equal(mlp.down_proj.weight.data, full["layers.0.mlp.down_proj.weight"][:, rows])
        vocab = 384 // tp_size
        vrows = slice(rank * vocab, (rank + 1) * vocab)
        assert torch.equal(model.embed_tokens.weight.data, full["embed_tokens.weight"][vrows])
        assert torch.equal(model.lm_head.weight.data, full["lm_head.weight"][vrows])
        assert torch.equal(model.norm.weight.data, full["norm.weight"])  # replicated


def test_vocab_padding_is_zero(tiny_model_dir):
    """384 rows over 5 ranks do not divide: the last rank's padding rows are zeros."""
    from tessellm.layers.vocab import VocabParallelEmbedding

    full = _full(tiny_model_dir("llama"))["embed_tokens.weight"]
    pieces = []
    for rank in range(5):
        emb = VocabParallelEmbedding(384, 64, TensorParallel(rank, 5))
        emb.load_weight(full)
        pieces.append(emb.weight.data)
    stacked = torch.cat(pieces)
    assert torch.equal(stacked[:384], full)
    assert stacked[384:].abs().sum() == 0


def test_pipeline_stage_holds_only_its_layers(tiny_model_dir):
    path = tiny_model_dir("llama-tied")
    full = _full(path)
    first = _build(path, TensorParallel(), PipelineStage(0, 2))
    last = _build(path, TensorParallel(), PipelineStage(1, 2))
    names0 = {n for n, _ in first.named_parameters()}
    names1 = {n for n, _ in last.named_parameters()}
    assert all(not n.startswith("layers.1.") for n in names0) and "embed_tokens.weight" in names0
    assert all(not n.startswith("layers.0.") for n in names1) and "norm.weight" in names1
    assert "norm.weight" not in names0 and "embed_tokens.weight" not in names1
    # Tied embeddings: the last stage's LM head is loaded from the embedding tensor.
    assert torch.equal(last.lm_head.weight.data, full["embed_tokens.weight"])
    assert len(first.attention_layers()) == len(last.attention_layers()) == 1


def test_bad_split_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size 3"):
        _build(tiny_model_dir("llama"), TensorParallel(0, 3))
