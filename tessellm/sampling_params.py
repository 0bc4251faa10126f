"""vLLM's ``vllm.sampling_params`` names, for code written against it:
``from tessellm.sampling_params import SamplingParams, StructuredOutputsParams, RequestOutputKind,
BeamSearchParams, RepetitionDetectionParams``
(and ``GuidedDecodingParams``, vLLM's older name for ``StructuredOutputsParams``)."""

from typing import Optional

from tessellm.core.repetition import RepetitionDetectionParams
from tessellm.core.sampling_params import RequestOutputKind, SamplingParams
from tessellm.entrypoints.beam_search import BeamSearchParams
from tessellm.structured_output.params import StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "RequestOutputKind",
           "BeamSearchParams", "RepetitionDetectionParams"]


def GuidedDecodingParams(*, backend: Optional[str] = None, whitespace_pattern: Optional[str] = None,  # noqa: N802
                         disable_fallback: bool = False, disable_additional_properties: bool = False,
                         **constraint) -> StructuredOutputsParams:
    """vLLM's older ``GuidedDecodingParams(json=..., regex=..., choice=..., grammar=...,
    json_object=..., structural_tag=...)``: a ``StructuredOutputsParams``. ``backend``: only
    xgrammar (or auto); ``whitespace_pattern``: use ``disable_any_whitespace=True`` instead."""
    if backend not in (None, "auto", "xgrammar") and not str(backend).startswith("xgrammar:"):
        raise ValueError(f"GuidedDecodingParams(backend={backend!r}): xgrammar is tessellm's structured-"
                         "output backend; leave backend out.")
    if whitespace_pattern is not None:
        raise ValueError("GuidedDecodingParams(whitespace_pattern=...) is not supported; "
                         "disable_any_whitespace=True gives JSON without optional whitespace.")
    if disable_additional_properties:
        raise ValueError("GuidedDecodingParams(disable_additional_properties=True) is not supported; "
                         "set \"additionalProperties\": false in the schema.")
    return StructuredOutputsParams(**constraint)
