"""vLLM's engine and server arguments (tessellm/entrypoints/vllm_args.py): a command line or an
``LLM(...)`` call written for vLLM runs unchanged, or stops with one message naming the argument
and what to use instead (never argparse's bare "unrecognized arguments")."""

from __future__ import annotations

import json
import os

import pytest

from tessellm.config import EngineArgs
from tessellm.entrypoints.cli import build_parser
from tessellm.entrypoints.engine_args import engine_args_from
from tessellm.entrypoints.vllm_args import ENGINE, SERVER, locate_model, pop_vllm_kwargs

# A vLLM deployment's command line (the flags its docs and recipes use most), as-is.
VLLM_COMMAND = [
    "--trust-remote-code", "--swap-space", "4", "--disable-log-requests", "--disable-log-stats",
    "--enable-log-requests", "-O3", "--cuda-graph-sizes", "1", "2", "4", "--max-seq-len-to-capture",
    "8192", "--disable-custom-all-reduce", "--tokenizer-mode", "auto", "--cpu-offload-gb", "0",
    "--scheduling-policy", "fcfs", "--guided-decoding-backend", "xgrammar", "--model-impl", "auto",
    "--structured-outputs-config", '{"backend": "xgrammar"}', "--num-gpu-blocks-override", "77",
    "--rope-scaling", '{"rope_type": "dynamic", "factor": 2.0}', "--rope-theta", "1e6",
    "-q", "fp8", "--hf-token", "hf_x", "--max-num-partial-prefills", "2", "--logprobs-mode", "raw_logprobs",
    "--no-enable-prefix-caching", "--max-model-len", "512",
    # older vLLM releases' flags
    "--enable-reasoning", "--use-v2-block-manager", "--num-scheduler-steps", "8", "--scheduler-delay-factor", "0.5",
]
SERVE_ONLY = ["--uvicorn-log-level", "critical", "--disable-uvicorn-access-log", "--disable-frontend-multiprocessing", "--max-log-len", "100",
              "--enable-log-outputs", "--disable-fastapi-docs", "--api-server-count", "1",
              "--chat-template-content-format", "string", "--h11-max-incomplete-event-size", "4194304"]


def test_a_vllm_command_line_parses_into_the_same_engine():
    args = build_parser().parse_args(["serve", "/m", *VLLM_COMMAND, *SERVE_ONLY])
    ea = engine_args_from(args, args.model)
    plain = build_parser().parse_args(["serve", "/m", "--no-enable-prefix-caching", "--max-model-len", "512"])
    expected = engine_args_from(plain, plain.model)
    expected.num_kv_blocks, expected.quantization = 77, "fp8"  # --num-gpu-blocks-override, -q
    expected.hf_overrides = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_theta": 1e6}
    assert ea == expected
    assert args.no_access_log  # --disable-uvicorn-access-log


def test_the_other_commands_take_the_engine_ones():
    for command in (["generate", "hi"], ["bench", "throughput"], ["bench", "latency"]):
        args = build_parser().parse_args([*command, *VLLM_COMMAND])
        assert engine_args_from(args, None).num_kv_blocks == 77


def test_rope_flags_join_hf_overrides():
    args = build_parser().parse_args(["serve", "--hf-overrides", '{"num_labels": 1}', "--rope-theta", "5e5"])
    assert engine_args_from(args, None).hf_overrides == {"num_labels": 1, "rope_theta": 5e5}


@pytest.mark.parametrize("argv,flag,hint", [
    (["--cpu-offload-gb", "4"], "--cpu-offload-gb", "--quantization"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode", "--tokenizer DIR"),
    (["--structured-outputs-config", '{"backend": "outlines"}'], "--structured-outputs-config", "xgrammar"),
    (["--kv-cache-memory", "1000000"], "--kv-cache-memory", "--num-kv-blocks"),
    (["--skip-tokenizer-init"], "--skip-tokenizer-init", "prompt_token_ids"),
    (["--headless"], "--headless", "--ray"),
    (["--api-server-count", "4"], "--api-server-count", "-dp N"),
    (["--otlp-traces-endpoint", "http://x"], "--otlp-traces-endpoint", "/metrics"),
    (["--compilation-config", "{bad"], "--compilation-config", None),  # not JSON is fine (-O3)
    (["--speculative-model", "/d", "--num-speculative-tokens", "3"], "--speculative-model", "--speculative-config"),
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens", "--speculative-config"),
    (["--worker-use-ray"], "--worker-use-ray", "--distributed-executor-backend ray"),
])
def test_a_value_that_would_change_something_is_refused_by_name(capsys, argv, flag, hint):
    parser = build_parser()
    if hint is None:
        parser.parse_args(["serve", *argv])
        return
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in err and "not supported by tessellm" in err and hint in err, err


def test_data_parallel_size_local_is_accepted_at_the_data_parallel_size():
    """vLLM's --data-parallel-size-local equal to -dp (every rank on this host: a no-op here),
    before or after -dp; any other value is one error naming both flags and the way out."""
    from tessellm.entrypoints.serve import _server_config

    parser = build_parser()
    for argv in (["-dp", "2", "--data-parallel-size-local", "2"], ["--data-parallel-size-local", "2", "-dp", "2"],
                 ["--data-parallel-size-local", "1"]):
        _server_config(parser.parse_args(["serve", *argv]))
    for argv, other in ((["-dp", "2", "--data-parallel-size-local", "1"], 2), (["--data-parallel-size-local", "2"], 1)):
        with pytest.raises(ValueError, match=f"--data-parallel-size-local .* the same as --data-parallel-size, {other} "
                                             r"here.*tessellm serve --ray --num-replicas N"):
            _server_config(parser.parse_args(["serve", *argv]))


def test_every_vllm_argument_has_help_and_a_flag():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    helps = {s: a.help for a in serve._actions for s in a.option_strings}
    for arg in ENGINE + SERVER:
        flag = "--" + arg.name.replace("_", "-")
        assert helps.get(flag), flag


def test_llm_kwargs_of_vllm():
    """LLM(..., trust_remote_code=True, swap_space=4, ...) as vLLM scripts write it."""
    model, kwargs = pop_vllm_kwargs({"trust_remote_code": True, "swap_space": 4, "disable_log_stats": True,
                                     "num_gpu_blocks_override": 32, "rope_theta": 1e6, "tokenizer_mode": "auto",
                                     "enforce_eager": True, "hf_overrides": {"a": 1}}, None)
    assert model is None and EngineArgs(**kwargs) == EngineArgs(
        num_kv_blocks=32, enforce_eager=True, hf_overrides={"a": 1, "rope_theta": 1e6})
    with pytest.raises(ValueError, match=r"LLM\(cpu_offload_gb=\.\.\.\): 8 is not supported.*--quantization"):
        pop_vllm_kwargs({"cpu_offload_gb": 8}, None)


@pytest.fixture(scope="module")
def llm():
    """The bundled model with the kwargs of a typical vLLM script."""
    from tessellm import LLM

    llm = LLM(device="cpu", trust_remote_code=True, swap_space=4, disable_log_stats=True,
              gpu_memory_utilization=0.5, max_model_len=256, num_gpu_blocks_override=40, enforce_eager=True,
              max_logprobs=5, disable_custom_all_reduce=True)
    yield llm
    llm.shutdown()


def test_llm_runs_with_vllm_kwargs(llm):
    """It generates, and the translated kwargs took effect (num_gpu_blocks_override is the KV
    cache's size)."""
    from tessellm import SamplingParams

    assert llm.engine.core.info.num_kv_blocks == 40
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    same = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False,
                        priority=[0])
    assert same[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="first come, first served"):
        llm.generate(["Hello"], SamplingParams(max_tokens=1), use_tqdm=False, priority=[1])


def test_sampling_params_truncate_prompt_tokens(llm):
    """vLLM's SamplingParams.truncate_prompt_tokens: the prompt's last N tokens, generated from as
    that shorter prompt (greedy: the same tokens)."""
    from tessellm import SamplingParams

    ids = llm.get_tokenizer().encode("one two three four five six seven eight nine ten")
    greedy = dict(max_tokens=4, temperature=0, ignore_eos=True)
    cut = llm.generate([{"prompt_token_ids": ids}], SamplingParams(truncate_prompt_tokens=5, **greedy),
                       use_tqdm=False)[0]
    same = llm.generate([{"prompt_token_ids": ids[-5:]}], SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-5:] and cut.outputs[0].token_ids == same.outputs[0].token_ids
    long = llm.generate([{"prompt_token_ids": ids * 40}], SamplingParams(truncate_prompt_tokens=-1, **greedy),
                        use_tqdm=False)[0]
    n = len(long.prompt_token_ids)  # -1: as many as the context holds (room for one token)
    assert n == 255 and long.prompt_token_ids == (ids * 40)[-n:]
    with pytest.raises(ValueError, match="truncate_prompt_tokens is 300, over the model's context length of 256"):
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(truncate_prompt_tokens=300), use_tqdm=False)


def test_truncate_prompt_tokens_offline_and_served(llm):
    """-1 offline is the context (less the one token generated; vLLM's LLM asks no output room);
    at the server it is the context less the request's output budget, as vLLM's server
    (``build_tok_params``: max_completion_tokens or max_tokens, /v1/completions' default 16,
    chat's none), and a count over that room is a 400 naming truncate_prompt_tokens."""
    from tessellm import SamplingParams
    from tessellm.entrypoints.openai.errors import OpenAIError
    from tessellm.entrypoints.openai.prompts import truncation
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    ids = list(range(10, 30)) * 20  # 400 tokens, past the context of 256
    offline = llm.generate([{"prompt_token_ids": ids}], SamplingParams(truncate_prompt_tokens=-1, max_tokens=3),
                           use_tqdm=False)[0]
    assert len(offline.prompt_token_ids) == 255
    chat = [{"role": "user", "content": "hi"}]
    served = [(CompletionRequest(model="m", prompt=ids, max_tokens=3, truncate_prompt_tokens=-1), 253),
              (CompletionRequest(model="m", prompt=ids, truncate_prompt_tokens=-1), 256 - 16),
              (ChatCompletionRequest(model="m", messages=chat, max_completion_tokens=3, max_tokens=9,
                                     truncate_prompt_tokens=-1), 253),
              (ChatCompletionRequest(model="m", messages=chat, truncate_prompt_tokens=-1), 255),
              (CompletionRequest(model="m", prompt=ids, max_tokens=3, truncate_prompt_tokens=253), 253)]
    assert [truncation(req, 256) for req, _ in served] == [want for _, want in served]
    for req in (CompletionRequest(model="m", prompt=ids, truncate_prompt_tokens=300),
                CompletionRequest(model="m", prompt=ids, max_tokens=3, truncate_prompt_tokens=254),
                CompletionRequest(model="m", prompt=ids, truncate_prompt_tokens=241)):
        with pytest.raises(OpenAIError) as bad:
            truncation(req, 256)
        assert bad.value.status == 400 and bad.value.param == "truncate_prompt_tokens", bad.value.message
    with pytest.raises(OpenAIError) as bad:  # no room left for a prompt at all
        truncation(CompletionRequest(model="m", prompt=ids, max_tokens=256, truncate_prompt_tokens=-1), 256)
    assert bad.value.param == "max_tokens"
    # 0 would empty the prompt: refused offline, and by the server with the same words (the
    # field's range check, ge=-1, lets it through)
    with pytest.raises(ValueError) as offline_zero:
        SamplingParams(truncate_prompt_tokens=0)
    for req in (CompletionRequest(model="m", prompt=ids, truncate_prompt_tokens=0),
                ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                      truncate_prompt_tokens=0)):
        with pytest.raises(OpenAIError) as bad:
            truncation(req, 256)
        assert (bad.value.status, bad.value.param) == (400, "truncate_prompt_tokens")
        assert bad.value.message == str(offline_zero.value) == (
            "truncate_prompt_tokens must be -1 (as many as the context holds) or an integer >= 1, got 0.")


def test_sampling_params_vllm_fields():
    from tessellm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

    p = SamplingParams(n=2, best_of=2, detokenize=True, spaces_between_special_tokens=True, logits_processors=[],
                       guided_decoding=GuidedDecodingParams(choice=["a", "b"], backend="xgrammar"),
                       extra_args={"k": 1})
    assert p.structured_outputs == StructuredOutputsParams(choice=["a", "b"]) and p.guided_decoding is None
    import dataclasses

    assert SamplingParams(**dataclasses.asdict(p)) == p  # as the engine core receives it
    for kwargs, match in [({"detokenize": False}, "token_ids"), ({"best_of": 3}, "best_of"),
                          ({"logits_processors": [print]}, "LLM\\(logits_processors"),
                          ({"spaces_between_special_tokens": False}, "skip_special_tokens"),
                          ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="xgrammar"):
        GuidedDecodingParams(json={"type": "object"}, backend="outlines")


def test_llm_chat_vllm_keywords(llm):
    """LLM.chat's vLLM keywords: chat_template_kwargs and tools reach the template,
    continue_final_message leaves the last message open."""
    from tessellm import SamplingParams

    template = ("{% if tools %}T:{{ tools[0].function.name }}|{% endif %}{{ greeting }}|"
                "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    one = SamplingParams(max_tokens=1)
    out = llm.chat([{"role": "user", "content": "hi"}], one, use_tqdm=False, chat_template=template,
                   tools=tools, chat_template_kwargs={"greeting": "yo"})[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "T:f|yo|user:hi;"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    out = llm.chat(conv, one, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids).endswith("The answer is")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(conv, one, use_tqdm=False, continue_final_message=True)
    with pytest.raises(ValueError, match="one of auto, string, openai, got 'parts'"):
        llm.chat(conv, one, use_tqdm=False, chat_template_content_format="parts")


def test_llm_chat_positional_order_is_vllms(llm):
    """LLM.chat(messages, sampling_params, use_tqdm, lora_request, chat_template,
    chat_template_content_format, add_generation_prompt, continue_final_message, ...): vLLM's
    positions give what its keywords give; a call in tessellm's old order (add_generation_prompt
    4th, lora_request 6th) is one error naming the keyword to use."""
    from tessellm import SamplingParams

    template = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    one = SamplingParams(max_tokens=1)
    by_position = llm.chat(conv, one, False, None, template, "string", False, True)[0]
    by_keyword = llm.chat(conv, one, use_tqdm=False, chat_template=template, add_generation_prompt=False,
                          continue_final_message=True)[0]
    assert by_position.prompt_token_ids == by_keyword.prompt_token_ids
    assert llm.get_tokenizer().decode(by_position.prompt_token_ids) == "user:hi;assistant:The answer is"
    with pytest.raises(ValueError, match="4th positional argument is lora_request .* add_generation_prompt=False"):
        llm.chat(conv, one, False, False)
    from tessellm.lora.request import LoRARequest

    with pytest.raises(ValueError, match="6th positional argument is chat_template_content_format .* lora_request="):
        llm.chat(conv, one, False, None, template, LoRARequest("a", 1, "/nowhere"))
    with pytest.raises(ValueError, match="content_format must be 'auto', 'string' or 'openai', got a NoneType"):
        llm.chat(conv, one, chat_template_content_format=None)  # a keyword caller: told the values


def _hf_cache(root, repo: str, revisions: dict[str, str]) -> dict[str, str]:
    """A Hugging Face cache layout (models--org--name/{refs,snapshots}) holding ``repo`` at each
    ref -> commit; returns commit -> snapshot directory."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    paths = {}
    for ref, commit in revisions.items():
        snap = os.path.join(base, "snapshots", commit)
        os.makedirs(snap, exist_ok=True)
        with open(os.path.join(snap, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "commit": commit}, f)
        os.makedirs(os.path.join(base, "refs"), exist_ok=True)
        with open(os.path.join(base, "refs", ref), "w") as f:
            f.write(commit)
        paths[commit] = snap
    return paths


def test_download_dir_and_revision_find_the_repo(tmp_path):
    """--download-dir is the Hugging Face cache the repo was downloaded to (vLLM's), --revision a
    branch or commit in it; nothing is downloaded."""
    snaps = _hf_cache(tmp_path, "org/tiny", {"main": "a" * 40, "v2": "b" * 40})
    assert os.path.samefile(locate_model("org/tiny", str(tmp_path), None), snaps["a" * 40])
    assert os.path.samefile(locate_model("org/tiny", str(tmp_path), "v2"), snaps["b" * 40])
    args = build_parser().parse_args(["serve", "org/tiny", "--download-dir", str(tmp_path), "--revision", "v2"])
    assert os.path.samefile(engine_args_from(args, args.model).model, snaps["b" * 40])
    assert args.model == "org/tiny"  # the served name stays the repo id
    assert locate_model(str(tmp_path), str(tmp_path), None) == str(tmp_path)  # a directory stays
    with pytest.raises(FileNotFoundError, match=f"not in the Hugging Face cache in {tmp_path}"):
        locate_model("org/other", str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="at revision 'v3'"):
        locate_model("org/tiny", str(tmp_path), "v3")


def _parse(argv):
    from tessellm.entrypoints.serve import resolve_model_flag
    from tessellm.entrypoints.vllm_args import expand_argv

    parser = build_parser()
    args = parser.parse_args(expand_argv(argv, parser))
    resolve_model_flag(args)
    return args


def test_config_yaml(tmp_path):
    """vLLM's --config FILE.yaml: its flags (dashes or underscores), the command line's winning."""
    cfg = tmp_path / "vllm.yaml"
    cfg.write_text("model: /models/a\nport: 8001\nmax_model_len: 512\nenable-prefix-caching: false\n"
                   "trust-remote-code: true\nserved-model-name: [a, b]\nhf-overrides: {num_labels: 1}\n"
                   "swap-space: 4\nnum_gpu_blocks_override: 64\n")
    args = _parse(["serve", "--config", str(cfg), "--port", "9000"])
    ea = engine_args_from(args, args.model)
    assert (args.model, args.port, args.served_model_name) == ("/models/a", 9000, ["a", "b"])
    assert (ea.max_model_len, ea.enable_prefix_caching, ea.num_kv_blocks) == (512, False, 64)
    assert json.loads(ea.hf_overrides) == {"num_labels": 1}
    assert _parse(["serve", "/models/b", f"--config={cfg}"]).model == "/models/b"  # the command line's
    cfg.write_text("max_model_len: 512\nserved-model-name: [a, b]\n")  # a list flag last: MODEL not a value of it
    for argv in (["serve", "org/m", "--config", str(cfg)], ["serve", "--config", str(cfg), "org/m", "--port", "9"]):
        args = _parse(argv)
        assert (args.model, args.served_model_name, args.max_model_len) == ("org/m", ["a", "b"], 512), argv
    cfg.write_text("max-model-len: 512\nno-such-flag: 1\n")
    with pytest.raises(SystemExit, match="'no-such-flag' is not an option"):
        _parse(["serve", "--config", str(cfg)])


def test_underscore_flags():
    """vLLM's parser takes --max_model_len for --max-model-len."""
    args = _parse(["serve", "--max_model_len", "77", "--gpu_memory_utilization=0.5", "--swap_space", "4"])
    ea = engine_args_from(args, args.model)
    assert (ea.max_model_len, ea.gpu_memory_utilization) == (77, 0.5)


def test_config_through_the_command(tmp_path, monkeypatch, capsys):
    """The command's own entry point reads --config (in this process: a subprocess took 8 s
    on 2 cores, most of it the engine forkserver that serve prestarts, not wanted here)."""
    from tessellm.entrypoints import cli

    monkeypatch.setattr(cli, "_prestart_engine_forkserver", lambda argv: None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cpu-offload-gb: 8\n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --cpu-offload-gb: 8.0 is not supported" in err, err
    cfg.write_text("model: org/m\n")  # a model key: the command line is parsed for MODEL first, quietly
    with pytest.raises(SystemExit):
        cli.main(["serve", "--config", str(cfg), "--cpu-offload-gb", "4"])
    assert capsys.readouterr().err.count("error:") == 1


def test_log_config_file(tmp_path):
    """vLLM's --log-config-file: a JSON dictConfig, applied (here: the tessellm logger's level and
    handler); a bad file is one error naming the flag."""
    import logging

    from tessellm.entrypoints.serve import apply_log_config

    log_file = tmp_path / "out.log"
    cfg = {"version": 1, "disable_existing_loggers": False,
           "handlers": {"f": {"class": "logging.FileHandler", "filename": str(log_file)}},
           "loggers": {"tessellm.test_log_config": {"handlers": ["f"], "level": "WARNING", "propagate": False}}}
    path = tmp_path / "log.json"
    path.write_text(json.dumps(cfg))
    args = build_parser().parse_args(["serve", "--log-config-file", str(path)])
    assert apply_log_config(args.log_config_file) == cfg
    logger = logging.getLogger("tessellm.test_log_config")
    logger.info("quiet")
    logger.warning("loud")
    for h in logger.handlers:
        h.flush()
    # exact: no "[emulated ...]" prefix, which an emulated engine or serve --emulate adds only
    # while it lives (an earlier test's left behind would show here)
    assert log_file.read_text() == "loud\n"
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--log-config-file .* is not a JSON logging dictConfig"):
        apply_log_config(str(path))
    with pytest.raises(ValueError, match="--log-config-file .*nope.json"):
        apply_log_config(str(tmp_path / "nope.json"))
