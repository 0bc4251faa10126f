"""Finding the engine's logits processor classes: those given (``LLM(logits_processors=[...])``,
``--logits-processors``) and those installed under the entry point groups
``tessellm.logits_processors`` and ``vllm.logits_processors`` (a package's
``[project.entry-points."tessellm.logits_processors"] name = "module:Class"``).

A class is given as the class itself, ``"module:Qual.Name"`` or a fully-qualified dotted name
(``"module.Class"``). The engine's other processes (worker ranks, the serving engine core) load
them by name (``spawn_names``), never by pickling a class.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Optional, Sequence

from tessellm.sample.logits_processor.interface import LogitsProcessor

logger = logging.getLogger(__name__)

GROUPS = ("tessellm.logits_processors", "vllm.logits_processors")
_VLLM_IMPORT = ("a processor written for vLLM: change `from vllm.v1.sample.logits_processor import "
                "...` to `from tessellm.sample.logits_processor import ...`")


def load_classes(specs: Optional[Sequence] = None, warn: bool = True) -> list[type]:
    """The installed entry points' classes, then ``specs``' (each once, in that order);
    ``warn``: log the installed ones skipped (``_installed``)."""
    classes: list[type] = []
    for cls in _installed(warn) + [load_class(s) for s in specs or ()]:
        if cls not in classes:
            classes.append(cls)
    return classes


def engine_classes(specs: Optional[Sequence], pooling: bool, speculative: bool, warn: bool = True) -> list[type]:
    """The classes an engine builds (its engine core and the rank that samples ask alike), as
    vLLM's ``build_logitsprocs``: none for a pooling engine or under speculative decoding, where
    processors cannot run; given ones are then refused, naming the fix, installed ones skipped
    with a warning (nobody asked for them here). ``warn``: False where the engine core has
    warned already (the worker ranks)."""
    if not pooling and not speculative:
        return load_classes(specs, warn)
    what = "this engine pools (embeddings)" if pooling else "speculative decoding is on"
    if specs:
        if pooling:
            raise ValueError("logits_processors apply to generating models; this engine pools "
                             "(embeddings); drop logits_processors.")
        names = ", ".join(s.__qualname__ if isinstance(s, type) else str(s) for s in specs)
        raise ValueError(f"Custom logits processors ({names}) do not combine with speculative decoding "
                         "yet (a processor sees one row per request; a verifying request has several); "
                         "drop speculative_config or logits_processors.")
    skipped = [f"{ep.name} = {ep.value!r}" for group in GROUPS for ep in entry_points(group=group)]
    if skipped and warn:
        logger.warning("Installed logits processor plugins not used (%s): %s.", what, ", ".join(skipped))
    return []


def load_class(spec) -> type:
    """One class from a class, ``"module:Qual.Name"`` or ``"module.Class"``; ValueError naming
    what is wrong with it."""
    if isinstance(spec, type):
        return _checked(spec, spec.__qualname__)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"logits_processors takes classes or their names ('module:Class'), got {spec!r}.")
    module_name, _, qualname = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not qualname:
        raise ValueError(f"logits processor {spec!r}: give 'module:Class' or 'package.module.Class'.")
    try:
        obj = importlib.import_module(module_name)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"logits processor {spec!r} cannot be loaded ({type(exc).__name__}: {exc}); "
                         "give 'module:Class' of a module on the Python path of the engine.") from exc
    return _checked(obj, spec)


def _checked(obj, name: str) -> type:
    if not isinstance(obj, type) or not issubclass(obj, LogitsProcessor):
        raise ValueError(f"logits processor {name} is not a subclass of "
                         f"tessellm.sample.logits_processor.LogitsProcessor ({_VLLM_IMPORT}).")
    return obj


def _installed(warn: bool = True) -> list[type]:
    """The entry points' classes. One of ``tessellm.logits_processors`` (installed for
    tessellm) that fails to load stops the engine, naming it. One of ``vllm.logits_processors``
    was installed for vLLM and may import vLLM itself: nobody asked tessellm for it, so one
    that fails is skipped with a warning naming its package (a class the user names in
    ``logits_processors`` still loads or fails there, ``load_class``)."""
    classes = []
    for group in GROUPS:
        for ep in entry_points(group=group):
            try:
                classes.append(_checked(ep.load(), ep.value))
            except Exception as exc:
                package = getattr(getattr(ep, "dist", None), "name", None) or "unknown"
                where = f"{ep.name} = {ep.value!r} (package {package}, entry point group {group})"
                if group == GROUPS[0]:
                    raise ValueError(f"The logits processor plugin {where} failed to load: {exc}; fix "
                                     "or uninstall its package.") from exc
                if warn:
                    logger.warning("Skipping the vLLM logits processor plugin %s: it failed to load "
                                   "under tessellm (%s: %s). If you want it, port it (%s) and name it "
                                   "in logits_processors; else uninstall %s to silence this.",
                                   where, type(exc).__name__, exc, _VLLM_IMPORT, package)
    return classes


def spawn_names(specs: Optional[Sequence]) -> Optional[list[str]]:
    """``specs`` as names another process can import: a class becomes ``"module:Qual.Name"``.
    A class of the running script (``__main__``) or of a function's body cannot be found there:
    ValueError with the fix."""
    if specs is None:
        return None
    names = []
    for spec in specs:
        if not isinstance(spec, type):
            names.append(spec)
            continue
        if spec.__module__ == "__main__" or "<locals>" in spec.__qualname__:
            raise ValueError(f"logits processor {spec.__qualname__} is defined in "
                             f"{'the running script' if spec.__module__ == '__main__' else 'a function'}, "
                             "which the engine's other processes cannot import (tensor/pipeline/data "
                             "parallelism and tessellm serve run them apart); move it into a module on "
                             "the Python path and pass the class or 'module:Class'.")
        names.append(f"{spec.__module__}:{spec.__qualname__}")
    return names


def validate_request(classes: Sequence[type], params) -> None:
    """Every processor's ``validate_params(params)``; a ValueError (or TypeError) names the
    processor. Anything else a processor raises is its bug: reported the same way."""
    for cls in classes:
        try:
            cls.validate_params(params)
        except Exception as exc:  # noqa: BLE001 - whatever it raises refuses the request only
            raise ValueError(f"{exc} (logits processor {cls.__qualname__} refused the request's "
                             "sampling parameters; see its extra_args)") from exc
