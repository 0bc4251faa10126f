"""The toy backend plugin. tessellm imports this module through the entry point declared in
pyproject.toml, then calls the functions marked @hookimpl below."""

from __future__ import annotations

from tessellm.backends.spec import AttentionSpec, Backend, GraphSpec, QuantSpec, hookimpl

# The plugin API version this plugin needs: 5 for attention sinks (an older tessellm would never
# pass ``sinks``, and would refuse a model with them only if the kernel did not declare them).
TESSELLM_PLUGIN_API_REQUIRED = 5
NAME = "toy"


@hookimpl
def tessellm_register_backends(register):
    register(Backend(
        name=NAME, device_type="cpu", dist_backend="gloo",
        priority=-10,  # below cpu: --device=auto never picks the toy
        is_available=lambda: True,
        description="Example third-party backend: block-streaming attention on the CPU.",
        validated_on="hardware",
        validation_note="Runs on the host CPU; passes the tessellm conformance suite.",
        capabilities={"graph_capture": True, "quantization": ["int8"],
                      "kv_cache_dtypes": ["auto"], "sliding_window": True,
                      "attention_sinks": True},
    ))


@hookimpl
def tessellm_attention_kernel(backend: Backend, spec: AttentionSpec):
    if backend.name != NAME:
        return None
    from tessellm_toy.attention import ToyAttentionKernel

    return ToyAttentionKernel(spec)


@hookimpl
def tessellm_graph_runner(backend: Backend, spec: GraphSpec):
    if backend.name != NAME or spec.enforce_eager:
        return None
    from tessellm_toy.graph import ToyCompiledGraphRunner

    sizes = spec.capture_sizes or tuple(s for s in (1, 2, 4, 8) if s <= spec.max_num_seqs)
    return ToyCompiledGraphRunner(sizes or (1,))


@hookimpl
def tessellm_quant_method(backend: Backend, spec: QuantSpec):
    if backend.name != NAME or spec.scheme != "int8":
        return None
    from tessellm_toy.quant import ToyInt8LinearMethod

    return ToyInt8LinearMethod()
