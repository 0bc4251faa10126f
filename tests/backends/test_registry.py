"""The plugin registry: discovery, priorities, TESSELLM_PLUGINS, broken and mismatched plugins,
API versions, overriding one piece with tryfirst, and --device errors."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends import spec
from tessellm.backends.registry import BackendRegistry, DeviceError, PluginError, get_registry
from tessellm.backends.spec import AttentionSpec, Backend, OpsSpec

from backend_plugins import make_plugin

IN_TREE = {"cpu", "cuda", "rocm", "xpu", "tpu"}
ATTN = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32, block_size=16)


def fake_backend(name, priority, available=True):
    return make_plugin(f"fake_{name}", f"""
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name={name!r}, device_type="cpu", dist_backend="gloo",
                             priority={priority}, is_available=lambda: {available}))
    """)


def only(*plugins):
    return BackendRegistry(load_entry_points=False, plugins=plugins)


# -- discovery ---------------------------------------------------------------------------------


def test_in_tree_backends_load_through_entry_points():
    registry = BackendRegistry()
    assert IN_TREE <= set(registry.plugins)
    for name in IN_TREE:
        assert registry.backends[name].plugin_name == name
        assert registry.plugins[name].module == f"tessellm.backends.{name}.plugin"
        assert registry.plugins[name].distribution == "tessellm"


def test_third_party_entry_point_is_discovered(fake_site):
    # priority 500: above every in-tree backend (cuda 100), so `auto` picks it on a GPU machine too
    fake_site("fakeplug-npu", {"npu": "fakeplug_npu"}, {"fakeplug_npu": """
        from tessellm.backends.spec import Backend, hookimpl
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="npu", device_type="cpu", dist_backend="gloo", priority=500,
                             is_available=lambda: True))
    """})
    registry = BackendRegistry()
    assert registry.backends["npu"].plugin_name == "npu"
    assert registry.plugins["npu"].distribution == "fakeplug-npu"
    assert registry.select("auto").name == "npu"  # priority 500 beats every in-tree backend


def test_get_registry_loads_once_per_process():
    assert get_registry() is get_registry()


# -- selection and priorities -------------------------------------------------------------------


def test_auto_picks_highest_priority_available():
    registry = only(("a", fake_backend("alpha", 10)), ("b", fake_backend("beta", 50, False)),
                    ("c", fake_backend("gamma", 20)))
    assert registry.select("auto").name == "gamma"  # beta is higher but unavailable


def test_auto_tie_is_an_error_naming_both():
    registry = only(("a", fake_backend("alpha", 10)), ("b", fake_backend("beta", 10)))
    with pytest.raises(DeviceError, match=r"alpha \(a\).*beta \(b\).*--device"):
        registry.select("auto")
    assert registry.select("beta").name == "beta"  # explicit choice still works


def test_unknown_device_lists_known_ones():
    with pytest.raises(DeviceError, match=r"Unknown device 'npu9'.*cpu.*rocm"):
        get_registry().select("npu9")


def test_unavailable_device_names_plugin_and_alternatives():
    with pytest.raises(DeviceError, match=r"'tpu' \(plugin 'tpu'\) is not available.*cpu"):
        get_registry().select("tpu")


def test_llm_with_unknown_device_fails_before_loading(tiny_llama):
    from tessellm import LLM

    with pytest.raises(DeviceError, match="npu9"):
        LLM(tiny_llama, device="npu9")


def test_availability_probe_that_raises_counts_as_unavailable():
    plugin = make_plugin("flaky", """
        def boom():
            raise OSError("driver missing")
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="flaky", device_type="cpu", dist_backend="gloo", priority=99,
                             is_available=boom))
    """)
    registry = only(("flaky", plugin), ("a", fake_backend("alpha", 1)))
    assert registry.select("auto").name == "alpha"


# -- TESSELLM_PLUGINS -------------------------------------------------------------------------


def test_tessellm_plugins_limits_loading(monkeypatch):
    monkeypatch.setenv("TESSELLM_PLUGINS", "cpu, rocm")
    registry = get_registry()
    assert set(registry.plugins) == {"cpu", "rocm"}
    assert set(registry.backends) == {"cpu", "rocm"}


def test_tessellm_plugins_naming_a_missing_plugin_fails(monkeypatch):
    monkeypatch.setenv("TESSELLM_PLUGINS", "cpu,npu7")
    with pytest.raises(PluginError, match=r"TESSELLM_PLUGINS names 'npu7'.*installed.*cpu"):
        BackendRegistry(allowed={"cpu", "npu7"})


# -- broken plugins ----------------------------------------------------------------------------


def test_plugin_that_fails_to_import_is_disabled_alone_with_its_name(fake_site, caplog):
    fake_site("fakeplug-broken", {"broken": "fakeplug_broken"},
              {"fakeplug_broken": "import torch_not_a_module\n"})
    registry = BackendRegistry()
    assert registry.broken["broken"].startswith(
        "Backend plugin 'broken' (fakeplug_broken from package fakeplug-broken 0.1) failed to "
        "import: ModuleNotFoundError")
    assert "broken" not in registry.plugins and registry.select("cpu").name == "cpu"
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "'broken'" in warning and "\n" not in warning
    with pytest.raises(DeviceError, match=r"^Device 'broken' is unavailable because its backend "
                                          r"plugin 'broken' failed to load: .*torch_not_a_module"):
        registry.select("broken")
    # The way out the message names: leave it out.
    assert "broken" not in BackendRegistry(allowed={"cpu"}).broken


def test_plugin_needing_newer_api_is_refused():
    plugin = make_plugin("future", """
        TESSELLM_PLUGIN_API_REQUIRED = 99
        @hookimpl
        def tessellm_register_backends(register):
            pass
    """)
    with pytest.raises(PluginError, match=r"'future' needs tessellm plugin API 99.*provides API "
                                          + str(spec.TESSELLM_PLUGIN_API)):
        only(("future", plugin))


def test_plugin_with_bad_api_declaration_is_refused():
    plugin = make_plugin("weird", "TESSELLM_PLUGIN_API_REQUIRED = '2'\n")
    with pytest.raises(PluginError, match="positive integer"):
        only(("weird", plugin))


def test_misspelled_hook_is_refused():
    plugin = make_plugin("typo", """
        @hookimpl
        def tessellm_atention_kernel(backend, spec):
            return None
    """)
    with pytest.raises(PluginError, match=r"'typo' does not match.*tessellm_atention_kernel"):
        only(("typo", plugin))


def test_hook_without_hookimpl_is_refused():
    plugin = make_plugin("unmarked", """
        def tessellm_attention_kernel(backend, spec):
            return None
    """)
    with pytest.raises(PluginError, match=r"'unmarked' defines tessellm_attention_kernel "
                                          r"without @hookimpl"):
        only(("unmarked", plugin))


def test_hook_with_unknown_argument_is_refused():
    plugin = make_plugin("badargs", """
        @hookimpl
        def tessellm_attention_kernel(backend, spec, stream):
            return None
    """)
    with pytest.raises(PluginError, match=r"'badargs' does not match.*stream"):
        only(("badargs", plugin))


def test_hook_wrapper_is_refused():
    plugin = make_plugin("wrapper", """
        @hookimpl(wrapper=True)
        def tessellm_attention_kernel(backend, spec):
            return (yield)
    """)
    with pytest.raises(PluginError, match=r"'wrapper' implements tessellm_attention_kernel as a "
                                          r"wrapper"):
        only(("wrapper", plugin))


def test_hook_with_fewer_arguments_is_accepted():
    plugin = make_plugin("lean", """
        from tessellm.backends.reference.ops import ReferenceOps
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend(name="lean", device_type="cpu", dist_backend="gloo", priority=1,
                             is_available=lambda: True))
        @hookimpl
        def tessellm_fused_ops(backend):
            return ReferenceOps() if backend.name == "lean" else None
    """)
    registry = only(("lean", plugin))
    ops, who = registry.provider("ops", registry.backends["lean"], OpsSpec(torch.float32))
    assert who == "lean" and ops is not None


def test_register_hook_that_raises_names_the_plugin():
    plugin = make_plugin("crashy", """
        @hookimpl
        def tessellm_register_backends(register):
            raise RuntimeError("no driver")
    """)
    with pytest.raises(PluginError, match=r"'crashy' raised in tessellm_register_backends: "
                                          r"RuntimeError: no driver"):
        only(("crashy", plugin))


def test_duplicate_backend_names_are_an_error_naming_both():
    with pytest.raises(PluginError, match=r"'alpha' is registered by both 'a' and 'b'"):
        only(("a", fake_backend("alpha", 1)), ("b", fake_backend("alpha", 2)))


@pytest.mark.parametrize("fields,problem", [
    ("name='Bad Name'", "name 'Bad Name'"), ("name='auto'", "not 'auto'"),
    ("validated_on='lab'", "validated_on 'lab'"), ("priority='high'", "priority 'high'")])
def test_invalid_backend_is_refused(fields, problem):
    base = dict(name="'ok'", device_type="'cpu'", dist_backend="'gloo'", priority="1",
                is_available="lambda: True")
    key, value = fields.split("=", 1)
    base[key] = value
    args = ", ".join(f"{k}={v}" for k, v in base.items())
    plugin = make_plugin("invalid", f"""
        @hookimpl
        def tessellm_register_backends(register):
            register(Backend({args}))
    """)
    with pytest.raises(PluginError, match=f"'invalid' registered an invalid backend: .*{problem}"):
        only(("invalid", plugin))


def test_hook_returning_wrong_type_names_plugin_and_missing_members():
    plugin = make_plugin("sloppy", """
        class NotAKernel:
            name = "nope"
        @hookimpl(tryfirst=True)
        def tessellm_attention_kernel(backend, spec):
            return NotAKernel()
    """)
    registry = BackendRegistry(plugins=[("sloppy", plugin)])
    with pytest.raises(PluginError, match=r"'sloppy' returned NotAKernel.*lacks build_metadata, "
                                          r"forward, supports_sliding_window"):
        registry.attention_kernel(registry.backends["cpu"], ATTN)


def test_hook_raising_names_the_plugin():
    plugin = make_plugin("explody", """
        @hookimpl(tryfirst=True)
        def tessellm_fused_ops(backend, spec):
            raise KeyError("oops")
    """)
    registry = BackendRegistry(plugins=[("explody", plugin)])
    with pytest.raises(PluginError, match=r"'explody' raised in tessellm_fused_ops for backend "
                                          r"'cpu': KeyError"):
        registry.fused_ops(registry.backends["cpu"], OpsSpec(torch.float32))


def test_unsupported_spec_error_keeps_its_type_and_gains_the_plugin_name():
    registry = get_registry()
    bad = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=24, dtype=torch.bfloat16, block_size=16)
    with pytest.raises(ValueError, match=r"\[plugin 'rocm', tessellm_attention_kernel\] .*head size"):
        registry.attention_kernel(registry.backends["rocm"], bad)


# -- overriding one piece ----------------------------------------------------------------------

OVERRIDE = """
    TESSELLM_OVERRIDES = ("cpu",)
    from tessellm.backends.cpu.attention import CpuAttentionKernel
    class FastCpuKernel(CpuAttentionKernel):
        name = "fast-cpu"
    @hookimpl(tryfirst=True)
    def tessellm_attention_kernel(backend, spec):
        if backend.name != "cpu" or spec.head_size != 64:
            return None   # only the shapes it is tuned for; cpu's own kernel serves the rest
        return FastCpuKernel(spec)
"""


def test_tryfirst_override_of_one_piece_for_a_backend_it_does_not_own():
    registry = BackendRegistry(plugins=[("fastattn", make_plugin("fastattn", OVERRIDE))])
    cpu = registry.backends["cpu"]
    kernel, who = registry.provider("attention", cpu, ATTN)
    assert (kernel.name, who) == ("fast-cpu", "fastattn")
    other = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, dtype=torch.float32, block_size=16)
    assert registry.provider("attention", cpu, other)[1] == "cpu"
    assert registry.provider("ops", cpu, OpsSpec(torch.float32))[1] == "cpu"  # untouched
    assert registry.implementers("attention")[0] == "fastattn"
    assert cpu.plugin_name == "cpu"  # the backend still belongs to its plugin


def test_undeclared_override_is_refused_naming_the_plugin_and_the_fix():
    """A tryfirst hook that forgets to check backend.name would serve cpu: refused, loudly."""
    sloppy = make_plugin("sloppyattn", OVERRIDE.replace('TESSELLM_OVERRIDES = ("cpu",)', ""))
    registry = BackendRegistry(plugins=[("sloppyattn", sloppy)])
    with pytest.raises(PluginError, match=r"'sloppyattn' answered tessellm_attention_kernel for "
                                          r"backend 'cpu', which plugin 'cpu' owns.*"
                                          r"TESSELLM_OVERRIDES = \('cpu',\)"):
        registry.attention_kernel(registry.backends["cpu"], ATTN)


def test_override_is_used_by_a_real_generation(tiny_llama):
    """The engine asks the registry, so the override serves a real model (and stays correct)."""
    from tessellm.backends import registry as registry_mod
    from tessellm.loader.model_loader import build_model
    from tessellm.config import resolve_model

    registry = BackendRegistry(plugins=[("fastattn", make_plugin("fastattn2", OVERRIDE))])
    source = resolve_model(tiny_llama)
    _, kernel = build_model(source, "dummy", registry, registry.backends["cpu"], torch.float32,
                            torch.device("cpu"), 16)
    assert kernel.name == "cpu-sdpa"  # tiny llama: head size 16, the override declines
    assert registry_mod.BackendRegistry is BackendRegistry
