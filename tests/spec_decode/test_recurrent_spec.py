"""Speculative decoding on models whose layers keep a per-request recurrent state (Mamba2
mixers, gated DeltaNet): a verify step keeps the state after each of its tokens and the next
step keeps the one after the accepted prefix (``core/mamba_state.py``,
``backends/reference/recurrent_verify.py``).

Tiny random Mamba2, Granite 4.0-H (Mamba + attention + MoE) and Qwen3-Next (gated DeltaNet +
gated attention + MoE) models built from HF configs, greedy in float32, a vocabulary of
``VOCAB`` tokens and prompts that repeat themselves, so n-gram drafts are both accepted and
rejected: the tokens equal the run without speculation (whose tokens equal HF's:
tests/models), and the counters show both outcomes. A state kept past a rejected draft would
change the later tokens (the models' weights are sharp: ``TINY``'s initializer range). Nothing
is mocked."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.variant_parity import prompts, save_tiny

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
ENGINE = dict(device="cpu", dtype="float32", seed=0, block_size=4, num_kv_blocks=128)
VOCAB = 16  # small: a random model's greedy tokens often repeat an earlier n-gram


def repetitive_prompts() -> list[list[int]]:
    """Prompts that repeat a phrase (drafts to find) and one that does not (drafts rare)."""
    a, b, c = prompts((5, 3, 7), VOCAB, seed=11)
    return [a * 3, b * 4 + a[:2], c + c[:4], prompts((9,), VOCAB, seed=12)[0]]


def generate(path: str, spec=None, max_tokens: int = 20, **engine):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(path, speculative_config=spec, **{**ENGINE, **engine}) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts()], params,
                            use_tqdm=False)
        core = llm.engine.core
        stats = core.scheduler.spec_stats.copy() if spec is not None else None
        worker = getattr(core.executor, "worker", None)  # one process: the spare slots
        if spec is not None and worker is not None:
            assert worker.runner.mamba.spec_tokens == spec["num_speculative_tokens"]
    return [list(o.outputs[0].token_ids) for o in outs], stats


def assert_spec_matches_plain(path: str, spec=NGRAM, **engine) -> None:
    want, _ = generate(path, **engine)
    got, stats = generate(path, spec, **engine)
    assert got == want
    assert stats.num_drafts > 0
    assert 0 < stats.num_accepted_tokens, "some drafts should be accepted"
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "some drafts should be rejected"


@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    from tests.models.test_mamba2 import mamba2_config

    return save_tiny(mamba2_config(vocab_size=VOCAB), str(tmp_path_factory.mktemp("mamba2spec")))


@pytest.fixture(scope="module")
def qwen3_next_dir(tmp_path_factory):
    from tests.models.test_qwen3_next import qwen3_next_config

    return save_tiny(qwen3_next_config(vocab_size=VOCAB), str(tmp_path_factory.mktemp("qwen3nextspec")))


def test_ngram_on_mamba2_equals_plain_greedy(mamba2_dir):
    assert_spec_matches_plain(mamba2_dir)


def test_ngram_on_mamba2_with_chunked_prefill_and_async_scheduling(mamba2_dir):
    """A small token budget mixes verify steps with prefill chunks and cuts drafts; async
    scheduling verifies drafts reserved a step ahead (core/spec_ahead.py)."""
    assert_spec_matches_plain(mamba2_dir, max_num_batched_tokens=12, async_scheduling=True)


@pytest.mark.slow  # ~20 s; the Mamba2 and Qwen3-Next cases cover the same verify paths
def test_ngram_on_granite_hybrid_equals_plain_greedy(tmp_path):
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config

    path = save_tiny(granite_hybrid_config(vocab_size=VOCAB), str(tmp_path / "granite"))
    assert_spec_matches_plain(path, max_num_batched_tokens=16)


def test_ngram_on_qwen3_next_equals_plain_greedy(qwen3_next_dir):
    assert_spec_matches_plain(qwen3_next_dir)


@pytest.mark.slow  # ~17 s on 2 CPU ranks; the one-process cases cover the same rollback
def test_ngram_on_qwen3_next_tensor_parallel(qwen3_next_dir):
    """tensor_parallel_size=2 (gloo): each rank keeps the per-token states of its DeltaNet heads
    and rolls them back by the same scheduler counts."""
    assert_spec_matches_plain(qwen3_next_dir, tensor_parallel_size=2)


def test_verify_ops_composed_from_one_token_ops():
    """An ops object without the optional ``*_verify`` ops (a plugin written before API 13):
    the engine composes them from its one-token ops, position by position;
    outputs and every per-token state equal the reference's."""
    import torch

    from tessellm.backends.reference import gated_delta, mamba, recurrent_verify
    from tessellm.core.mamba_state import make_batch

    class OneTokenOps:
        mamba_state_update = staticmethod(mamba.selective_state_update)
        gated_delta_step = staticmethod(gated_delta.gated_delta_step)

    conv, ssm, delta = recurrent_verify.verify_ops(OneTokenOps())
    assert conv is recurrent_verify.mamba_conv1d_verify
    batch = make_batch([2, 3, 4], [0, 5, 2], torch.device("cpu"), 2,
                       [9, 10, 5, 11, 12, 13, 2]).verifies
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(7, 2, 4, generator=g), torch.randn(7, 2, generator=g)
    B, C = torch.randn(7, 1, 8, generator=g), torch.randn(7, 1, 8, generator=g)
    A, D, bias = -torch.rand(2, generator=g), torch.randn(2, generator=g), torch.randn(2, generator=g)
    init = torch.randn(14, 2, 4, 8, generator=g)
    got_state, want_state = init.clone(), init.clone()
    got = ssm(x, dt, A, B, C, D, bias, got_state, batch, (0.0, float("inf")))
    want = recurrent_verify.mamba_state_update_verify(x, dt, A, B, C, D, bias, want_state, batch)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state, want_state)
    assert not torch.equal(got_state[[9, 10, 5, 11, 12, 13, 2]], init[[9, 10, 5, 11, 12, 13, 2]])
    q, k = torch.randn(7, 1, 4, generator=g), torch.randn(7, 1, 4, generator=g)
    v, gate, beta = torch.randn(7, 2, 3, generator=g), -torch.rand(7, 2, generator=g), torch.rand(7, 2, generator=g)
    init = torch.randn(14, 2, 4, 3, generator=g)
    got_state, want_state = init.clone(), init.clone()
    got = delta(q, k, v, gate, beta, got_state, batch, 0.5)
    want = recurrent_verify.gated_delta_verify(q, k, v, gate, beta, want_state, batch, 0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state, want_state)


@pytest.mark.slow  # ~80 s: the Triton kernels in the interpreter
@pytest.mark.interpreted
def test_ngram_on_mamba2_on_emulated_cuda(mamba2_dir):
    """The cuda backend's path (the fused Triton verify kernels, eager verify steps beside
    captured decode graphs) under the Triton interpreter."""
    assert_spec_matches_plain(mamba2_dir, device="cuda", emulate=True)


def test_draft_model_over_mamba2_equals_plain_greedy(mamba2_dir, tmp_path):
    """An attention-only draft model (a tiny random Llama of the same vocabulary) over a Mamba2
    target: its guesses are verified and the target's states roll back as for n-gram drafts."""
    from transformers import LlamaConfig

    from tests.models.variant_parity import TINY

    draft = save_tiny(LlamaConfig(**{**TINY, "vocab_size": VOCAB, "num_hidden_layers": 1}),
                      str(tmp_path / "draft"), seed=4)
    assert_spec_matches_plain(mamba2_dir, {"method": "draft_model", "model": draft,
                                           "num_speculative_tokens": 2})


def test_eagle_over_mamba2_equals_plain_greedy(mamba2_dir, tmp_path):
    """A random EAGLE-1 head (public layout) over a Mamba2 target: it reads the target's final
    hidden states and embedding; its drafts are accepted and rejected, the tokens unchanged."""
    from tests.models.variant_parity import TINY
    from tests.spec_decode.test_draft_proposers import _save_head

    head = _save_head(str(tmp_path / "eagle"), "eagle", {**TINY, "vocab_size": VOCAB}, 3)
    assert_spec_matches_plain(mamba2_dir, {"method": "eagle", "model": head,
                                           "num_speculative_tokens": 2})


def _save_eagle3_head(path: str, aux_layers: list[int], seed: int = 5) -> str:
    """A random EAGLE-3 head (public layout, as tests/spec_decode/test_draft_proposers.py builds
    them) over a target of ``VOCAB`` tokens and TINY's width, reading ``aux_layers``' inputs."""
    import json
    import os

    from tests.models.variant_parity import TINY
    from tests.spec_decode.test_draft_proposers import _save_head

    _save_head(path, "eagle3", {**TINY, "vocab_size": VOCAB}, seed, draft_vocab=VOCAB)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eagle_aux_hidden_state_layer_ids"] = aux_layers
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


@pytest.mark.parametrize("name", ["mamba2", "qwen3_next",
                                  *(pytest.param(n, marks=pytest.mark.slow)
                                    for n in ("granite4h", "nemotron_h", "falcon_h1"))])
def test_eagle3_over_hybrids_keeps_hf_greedy_tokens(name, tmp_path):
    """A random EAGLE-3 head over a 4-layer Mamba2 target (it reads the residual stream entering
    Mamba layers 0, 2 and 3), over Qwen3-Next (entering DeltaNet layer 0, the gated attention
    layer 1 and DeltaNet layer 3) and (slow: the Qwen3-Next case runs the same llama-family
    layer loop) Granite 4.0-H (Mamba layer 0, attention layer 1, Mamba layer 2), Nemotron-H (its
    Mamba, attention and last Mamba layers) and Falcon-H1 (attention and Mamba side by side):
    its drafts are verified and the states rolled back, and the greedy tokens are HF
    transformers'."""
    from tests.models.test_mamba2 import mamba2_config
    from tests.models.test_qwen3_next import qwen3_next_config
    from tests.models.variant_parity import hf_reference

    if name == "mamba2":
        config, aux = mamba2_config(vocab_size=VOCAB, num_hidden_layers=4), [0, 2, 3]
    elif name == "granite4h":
        from tests.models.test_granite_moe_hybrid import granite_hybrid_config

        config, aux = granite_hybrid_config(vocab_size=VOCAB), [0, 1, 2]
    elif name == "nemotron_h":  # Mamba, attention, Mamba (the MoE and MLP layers between)
        from tests.models.test_nemotron_h import nemotron_config

        config, aux = nemotron_config(vocab_size=VOCAB), [0, 1, 4]
    elif name == "falcon_h1":  # attention and Mamba side by side in each layer
        from tests.models.test_falcon_h1 import falcon_h1_config

        config, aux = falcon_h1_config(vocab_size=VOCAB), [0, 1, 2]
    else:
        config, aux = qwen3_next_config(vocab_size=VOCAB), [0, 1, 3]
    path = save_tiny(config, str(tmp_path / name))
    spec = {"method": "eagle3", "model": _save_eagle3_head(str(tmp_path / "eagle3"), aux),
            "num_speculative_tokens": 2}
    want, _ = hf_reference(path, repetitive_prompts(), 20)
    got, stats = generate(path, spec)
    assert got == want
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert stats.num_accepted_tokens < stats.num_draft_tokens, "some drafts should be rejected"
    # What the head reads: the residual stream entering each chosen layer, HF's hidden states
    # (``hidden_states[i]`` enters layer i), here of a whole prompt's prefill (one chunk: no
    # prefix caching, whose snapshots cut it at a block boundary).
    prompt = repetitive_prompts()[0]
    with LLM(path, speculative_config=spec, enable_prefix_caching=False, **ENGINE) as llm:
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
        ours = llm.engine.core.executor.worker.runner.model.aux_hidden_states
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    assert len(ours) == 3
    for i, got_layer in zip(aux, ours):
        torch.testing.assert_close(got_layer, theirs[i][0], rtol=1e-4, atol=1e-4)


def test_recurrent_draft_models_are_refused(mamba2_dir):
    with pytest.raises(ValueError, match="keeps a per-request recurrent state .*Mamba2ForCausalLM"
                                         ".* use an attention-only draft model"):
        LLM(mamba2_dir, dtype="float32", device="cpu",
            speculative_config={"method": "draft_model", "model": mamba2_dir,
                                "num_speculative_tokens": 2})


# -- Qwen3-Next's own MTP layer ---------------------------------------------------------------

def save_qwen3_next_with_mtp(path: str, predictable: bool = False, seed: int = 0,
                             state_scale: float = 0.0) -> str:
    """A tiny Qwen3-Next checkpoint with the ``mtp.*`` tensors of its released layout added
    (``mtp_num_hidden_layers = 1``): ``fc [H, 2H]``, the two ``pre_fc_norm_*`` and ``norm``
    ((1 + w) norms, stored as w), and ``mtp.layers.0.*``, a gated full-attention MoE layer
    (random: a copy of layer 1's tensor shapes). ``predictable``: every mixer's and MLP's
    output projection zero (target and MTP layer: the target is a bigram model),
    ``fc = [I | 0]``, the embedding norm 1 and the MTP norm the target's final norm, so the
    MTP layer's normed output is the target's at the next position up to a positive scale:
    every draft is the target's own next token. ``state_scale`` (with ``predictable``): the
    target's DeltaNet output projections kept at that scale, so its tokens depend on the
    recurrent states and the drafts are only mostly right."""
    import json
    import os

    import torch
    from safetensors.torch import load_file, save_file

    from tests.models.test_qwen3_next import qwen3_next_config

    save_tiny(qwen3_next_config(vocab_size=VOCAB), path, seed=seed)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_num_hidden_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    gen = torch.Generator().manual_seed(seed + 1)
    h = t["model.embed_tokens.weight"].shape[1]
    for name in [n for n in t if n.startswith("model.layers.1.")]:  # layer 1: full attention
        t["mtp.layers.0." + name[len("model.layers.1."):]] = (
            torch.randn(t[name].shape, generator=gen) * 0.2)
    t["mtp.fc.weight"] = torch.randn(h, 2 * h, generator=gen) * 0.2
    for part in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        t[f"mtp.{part}.weight"] = torch.rand(h, generator=gen) - 0.5
    if predictable:
        for name in t:
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                keep = state_scale if name.endswith("linear_attn.out_proj.weight") else 0.0
                t[name] = t[name] * keep
        t["mtp.fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        t["mtp.pre_fc_norm_embedding.weight"] = torch.zeros(h)  # 1 + w = 1
        t["mtp.norm.weight"] = t["model.norm.weight"].clone()
    save_file({k: v.contiguous() for k, v in t.items()}, file, metadata={"format": "pt"})
    return path


def test_qwen3_next_mtp_keeps_greedy_tokens(tmp_path):
    """Random MTP weights (its drafts rejected), vLLM's method name: the tokens without
    speculation; every verified draft counted."""
    path = save_qwen3_next_with_mtp(str(tmp_path / "q3n"))
    want, _ = generate(path, max_tokens=8)
    got, stats = generate(path, {"method": "qwen3_next_mtp", "num_speculative_tokens": 2},
                          max_tokens=8)
    assert got == want
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.parametrize("state_scale", [0.0, 0.05], ids=["bigram-target", "state-matters"])
def test_qwen3_next_mtp_that_predicts_the_target(tmp_path, state_scale):
    """The layout read right (fc's halves, the (1 + w) norms, the MTP layer's place): a target
    whose recurrent layers are off (a bigram model) gets every draft accepted; with them at a
    small scale the tokens depend on the states and drafts are accepted and rejected, so the
    states roll back to accepted prefixes of MTP drafts. The tokens are those without."""
    path = save_qwen3_next_with_mtp(str(tmp_path / "q3n"), predictable=True,
                                    state_scale=state_scale)
    want, _ = generate(path, max_tokens=12)
    got, stats = generate(path, {"method": "mtp", "num_speculative_tokens": 3}, max_tokens=12)
    assert got == want
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    if state_scale:
        assert stats.num_accepted_tokens < stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
