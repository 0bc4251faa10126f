"""Sharded state (vLLM's save_sharded_state / load_format="sharded_state"): each rank saves its
loaded weights to its own files and a later start reads them back, giving the same greedy
tokens and logprobs; TP=1 in process, TP=2 with gloo worker processes; every refusal."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors import safe_open

from tessellm import LLM, SamplingParams
from tessellm.loader.sharded_quant import check_supported
from tessellm.loader.sharded_state import rank_files, unique_tensors

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
PROMPTS = [[5, 17, 42, 99, 3, 250], list(range(40, 80))]


def _run(llm) -> list[tuple]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()}
                                      for step in o.outputs[0].logprobs]) for o in outs]


def test_shared_storage_stored_once():
    """Tied tensors (one storage) are kept under one name: the one covering the most memory,
    the smallest name among equals; separate tensors all stay."""
    base = torch.arange(12.0).reshape(3, 4)
    state = {"b.weight": base, "a.alias": base, "c.rows": base[:2], "d.other": base.clone(),
             "e.empty": torch.empty(0)}
    assert sorted(unique_tensors(state)) == ["a.alias", "d.other", "e.empty"]


def _copy_metadata(src: str, dst: str) -> None:
    """As vLLM's example: every non-weight file of the model next to the shards."""
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), dst)


def _save(path: str, out: str, tp: int, **save) -> list:
    """Greedy results and the files saved (through vLLM v1's ``engine_core``, at TP=2 its
    older ``model_executor``)."""
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=tp) as llm:
        expected = _run(llm)
        engine = llm.llm_engine
        saver = engine.engine_core if tp == 1 else engine.model_executor
        files = saver.save_sharded_state(path=out, **save)
    _copy_metadata(path, out)
    return expected, files


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_tp1_round_trip(tiny_model_dir, tmp_path, arch):
    path = tiny_model_dir(arch)
    out = str(tmp_path / "sharded")
    expected, files = _save(path, out, 1)
    assert [os.path.basename(f) for f in files] == ["model-rank-0-part-0.safetensors"]
    with safe_open(files[0], framework="pt") as f:
        names = set(f.keys())
    assert "embed_tokens.weight" in names
    assert ("lm_head.weight" in names) == (arch == "llama")  # a tied head reads the embedding
    with LLM(out, device="cpu", num_kv_blocks=64, seed=0, load_format="sharded_state") as llm:
        assert _run(llm) == expected


def test_tp2_round_trip_parts_and_layout_refusal(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    out = str(tmp_path / "sharded")
    expected, files = _save(path, out, 2, max_size=64 << 10)
    parts = rank_files(out)
    assert sorted(parts) == [0, 1] and all(len(p) > 1 for p in parts.values())  # max_size split it
    assert sorted(files) == sorted(f for p in parts.values() for f in p)
    with LLM(out, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2,
             load_format="sharded_state") as llm:
        assert _run(llm) == expected
    with pytest.raises(ValueError, match="files of 2 rank.*this engine has 1"):
        LLM(out, device="cpu", num_kv_blocks=64, load_format="sharded_state")


@pytest.mark.slow  # 4-8 s on 2 cores; the per-rank files of TP=2, with each stage's own tensors
def test_pp2_round_trip_and_layout_refusal(tiny_model_dir, tmp_path):
    """Pipeline parallel 2 (two gloo ranks on the CPU): each stage saves only its own layers
    (the embedding on the first, the final norm and LM head on the last) and loads them back
    with the same greedy tokens and logprobs; the state refused at TP=2 (same rank count)."""
    path = tiny_model_dir("llama")
    out = str(tmp_path / "sharded")
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, pipeline_parallel_size=2) as llm:
        expected = _run(llm)
        files = llm.llm_engine.model_executor.save_sharded_state(path=out)
    _copy_metadata(path, out)
    parts = rank_files(out)
    assert sorted(parts) == [0, 1] and sorted(files) == sorted(f for p in parts.values() for f in p)
    names = []
    for rank in (0, 1):
        with safe_open(parts[rank][0], framework="pt") as f:
            names.append(set(f.keys()))
    assert not names[0] & names[1]
    assert "embed_tokens.weight" in names[0] and {"norm.weight", "lm_head.weight"} <= names[1]
    with LLM(out, device="cpu", num_kv_blocks=64, seed=0, pipeline_parallel_size=2,
             load_format="sharded_state") as llm:
        assert _run(llm) == expected
    from tessellm.distributed.executor import WorkerDiedError

    with pytest.raises(WorkerDiedError, match="saved with tensor_parallel_size=1, this engine "
                                              "has tensor_parallel_size=2; start it with"):
        LLM(out, device="cpu", num_kv_blocks=64, tensor_parallel_size=2, load_format="sharded_state")


def test_lora_adapters_serve_the_same_tokens_on_a_sharded_state_load(tiny_model_dir, tmp_path):
    """A state saved by an engine with ``enable_lora`` holds the base model under its own names
    (a LoRA layer's ``base.`` dropped; no adapter slots), so an engine with LoRA on loads it and
    serves each adapter's tokens (and the base model's) as from the checkpoint. It was refused:
    the load fills the model before the LoRA layers wrap it."""
    from tessellm.lora import LoRARequest
    from tests.lora.adapters import make_adapters

    path, out = tiny_model_dir("llama-sharp"), str(tmp_path / "sharded")
    adapters = make_adapters(path, str(tmp_path / "adapters"), specs={
        "qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
        "mlp16": (16, ["o_proj", "gate_proj", "up_proj", "down_proj"], dict(lora_alpha=8))})
    loras = [None] + [LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(adapters.items())]
    kwargs = dict(device="cpu", dtype="float32", num_kv_blocks=64, seed=0, enable_lora=True,
                  max_loras=2, max_lora_rank=16)

    def run(llm) -> list:
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        return [[o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False,
                                                               lora_request=lora)]
                for lora in loras]

    with LLM(path, **kwargs) as llm:
        expected = run(llm)
        files = llm.save_sharded_state(out)
    assert expected[0] != expected[1] and expected[0] != expected[2]  # the adapters matter
    _copy_metadata(path, out)
    with safe_open(files[0], framework="pt") as f:
        names = set(f.keys())
    assert "layers.0.mlp.down_proj.weight" in names and not [n for n in names if ".base." in n]
    with LLM(out, load_format="sharded_state", **kwargs) as llm:
        assert run(llm) == expected


@pytest.mark.parametrize("quantization,tp", [("int8", 1), ("fp8", 1), ("int8", 2)])
def test_quantized_round_trip_as_stored(tiny_model_dir, tmp_path, quantization, tp):
    """int8 / fp8 quantized on load: the packed segments are saved as they are and rebuilt at
    load, bit for bit (no second quantization), giving the same tokens and logprobs."""
    path, out = tiny_model_dir("llama"), str(tmp_path / "sharded")
    kwargs = dict(device="cpu", num_kv_blocks=64, seed=0, quantization=quantization,
                  tensor_parallel_size=tp)
    with LLM(path, **kwargs) as llm:
        expected = _run(llm)
        files = llm.save_sharded_state(out)
    _copy_metadata(path, out)
    with safe_open(files[0], framework="pt") as f:
        qweight = f.get_tensor("layers.0.self_attn.qkv_proj.segments.0.qweight")
    assert qweight.dtype == (torch.int8 if quantization == "int8" else torch.float8_e4m3fn)
    with LLM(out, load_format="sharded_state", **kwargs) as llm:
        assert _run(llm) == expected
        if tp == 1:
            layer = llm.llm_engine.engine_core.executor.worker.runner.model.layers[0].self_attn.qkv_proj
            assert torch.equal(layer.segments[0].qweight.view(torch.int8), qweight.view(torch.int8))


def test_refusals(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    with pytest.raises(FileNotFoundError, match="no sharded-state files"):
        LLM(path, device="cpu", num_kv_blocks=64, load_format="sharded_state")
    out = str(tmp_path / "sharded")
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0) as llm:
        with pytest.raises(ValueError, match=r"must name both \{rank\} and \{part\}"):
            llm.save_sharded_state(out, pattern="model.safetensors")
        llm.save_sharded_state(out)
    _copy_metadata(path, out)
    with pytest.raises(ValueError, match="saved with dtype=float32.*dtype=bfloat16"):
        LLM(out, device="cpu", num_kv_blocks=64, dtype="bfloat16", load_format="sharded_state")
    other = tiny_model_dir("llama-tied")  # same shapes, no lm_head tensor: one missing
    tied = str(tmp_path / "tied")
    shutil.copytree(out, tied)
    shutil.copy(os.path.join(other, "config.json"), tied)
    with pytest.raises(ValueError, match="lack 1 of the model's tensors|does not have"):
        LLM(tied, device="cpu", num_kv_blocks=64, load_format="sharded_state")
    with pytest.raises(ValueError, match="saved with quantization=None, this engine has quantization=int8"):
        LLM(out, device="cpu", num_kv_blocks=64, quantization="int8", load_format="sharded_state")
    with pytest.raises(ValueError, match="cannot save a awq-quantized model yet"):
        check_supported(torch.nn.Linear(2, 2), "awq", "save")

def test_vllm_example_scripts_pattern(tiny_model_dir, tmp_path):
    """vLLM's save_sharded_state.py / load_sharded_state.py: EngineArgs from the example's
    flags, ``LLM(**dataclasses.asdict(engine_args))``, the v1 save path, every file whose
    extension is not a weight's copied over; then the load script's start; and a sharded
    state given without load_format is refused naming it."""
    import dataclasses

    from tessellm import EngineArgs
    from tessellm.utils import FlexibleArgumentParser

    model, out = tiny_model_dir("llama"), str(tmp_path / "out")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, "--device", "cpu", "--num-kv-blocks", "64"])
    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))
    expected = _run(llm)
    os.makedirs(out, exist_ok=True)
    assert hasattr(llm.llm_engine, "engine_core")  # the example's v1 check
    llm.llm_engine.engine_core.save_sharded_state(path=out, pattern=None, max_size=5 * 1024**3)
    llm.shutdown()
    for file in os.listdir(model):
        if os.path.splitext(file)[1] not in (".bin", ".pt", ".safetensors"):
            shutil.copy(os.path.join(model, file), out)
    args = parser.parse_args(["--model", out, "--device", "cpu", "--num-kv-blocks", "64",
                              "--load-format", "sharded_state"])
    with LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args))) as llm:
        assert _run(llm) == expected
    with pytest.raises(ValueError, match="load_format='sharded_state'"):
        LLM(out, device="cpu", num_kv_blocks=64)


def test_custom_pattern_round_trip_via_model_loader_extra_config(tiny_model_dir, tmp_path):
    """A state saved under ``save_sharded_state(pattern=...)`` loads with vLLM's
    ``model_loader_extra_config={"pattern": ...}`` (a dict, or its JSON on the command line),
    not without it; other keys, and a pattern without load_format="sharded_state", are refused."""
    from tessellm.entrypoints.engine_args import add_engine_arguments, engine_args_from
    from tessellm.utils import FlexibleArgumentParser

    path, out = tiny_model_dir("llama"), str(tmp_path / "sharded")
    pattern = "weights-{rank}-of-part-{part}.safetensors"
    expected, files = _save(path, out, 1, pattern=pattern)
    assert [os.path.basename(f) for f in files] == ["weights-0-of-part-0.safetensors"]
    kwargs = dict(device="cpu", num_kv_blocks=64, seed=0, load_format="sharded_state")
    with LLM(out, model_loader_extra_config={"pattern": pattern}, **kwargs) as llm:
        assert _run(llm) == expected
    with pytest.raises(FileNotFoundError, match="model_loader_extra_config"):
        LLM(out, **kwargs)
    args = add_engine_arguments(FlexibleArgumentParser()).parse_args(
        ["--load-format", "sharded_state", "--model-loader-extra-config", f'{{"pattern": "{pattern}"}}'])
    assert args.model_loader_extra_config == f'{{"pattern": "{pattern}"}}'
    engine_args_from(args, out).validate()
    with pytest.raises(ValueError, match=r"key\(s\) \['concurrency'\] are not supported.*only 'pattern'"):
        LLM(out, model_loader_extra_config={"pattern": pattern, "concurrency": 2}, **kwargs)
    with pytest.raises(ValueError, match="read by load_format='sharded_state' only"):
        LLM(path, device="cpu", model_loader_extra_config={"pattern": pattern})
    with pytest.raises(ValueError, match=r"must name both \{rank\} and \{part\}"):
        LLM(out, model_loader_extra_config={"pattern": "model.safetensors"}, **kwargs)
    LLM(path, device="cpu", num_kv_blocks=64, model_loader_extra_config={}).shutdown()  # vLLM's default


def test_a_second_save_into_the_same_folder_replaces_the_rank_files(tmp_path):
    """Saving again where fewer parts are written (a larger max_size) leaves none of the first
    save's parts behind: the load reads the second save's weights, not a stale part's."""
    from tessellm.loader.sharded_state import load_sharded_state, save_sharded_state

    layout = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "dtype": "torch.float32",
              "quantization": None}
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert len(save_sharded_state(model, str(tmp_path), 0, layout, max_size=64)) == 4
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert len(save_sharded_state(model, str(tmp_path), 0, layout)) == 1
    assert rank_files(str(tmp_path)) == {0: [str(tmp_path / "model-rank-0-part-0.safetensors")]}
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    load_sharded_state(fresh, str(tmp_path), 0, layout)
    for saved, loaded in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(saved, loaded)
