"""Sleep mode on one rank: give the device memory of the weights and the KV cache back, and
take it again (RLHF: the trainer uses the device between generation phases).

What each call does to the two kinds of memory (vLLM's tags, ``weights`` and ``kv_cache``)::

                     weights (parameters)       other model tensors      KV cache
    sleep(level=1)   copied to the host, freed  copied to the host, freed  dropped
    sleep(level=2)   freed (contents lost)      copied to the host, freed  dropped
    wake_up weights  storage back; host copy    storage back; host copy  -
                     (level 2: zeros, for
                     load_weights to fill)
    wake_up kv_cache -                          -                        zeroed, same size

"Other model tensors" are the buffers and tensor attributes of the model's modules (rotary
tables, quantization scales, LoRA slots): derived from the config, not the checkpoint, so a
level-2 sleep keeps them, as vLLM keeps the model's buffers (a recurrent-state model's state
slots are such attributes). A draft model's own weights (speculative decoding) are kept at
level 2 too: ``load_weights`` refills only the target's. The KV cache part includes a
recurrent-state model's prefix-cache snapshot pools (``MambaStateCache.allocate_snapshots``;
the layers hold them in a tuple): dropped, and zeroed at wake, as the blocks are.

How memory is freed: each storage that a model tensor lives in is resized to 0 bytes and later
back (``UntypedStorage.resize_``). Every tensor and view sharing that storage (a tied LM head, a
fused projection's slices, an attribute that views a parameter) points at the new memory when
it comes back, without the model knowing. A storage that cannot be resized (a memory mapping)
stays where it is and is counted in ``SleepReport.kept_bytes``.

Invariant: no step runs while any part is asleep (the engine refuses requests). The new memory
has new addresses, so captured graphs, which hold the old ones, are released at sleep and
captured again once both parts are awake.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)

TAGS = ("weights", "kv_cache")


@dataclass
class SleepReport:
    """What one rank's ``sleep`` did (bytes)."""

    offloaded_bytes: int = 0  # copied to the host, then freed on the device
    discarded_bytes: int = 0  # freed, contents dropped (level 2 parameters)
    kv_cache_bytes: int = 0  # the KV cache dropped
    kept_bytes: int = 0  # storages that cannot be resized: left where they are


@dataclass
class _Stored:
    """One storage some model tensor lives in, while its device memory is given back."""

    tensor: torch.Tensor  # any tensor on the storage (the storage object is its)
    nbytes: int
    is_param: bool
    host: Optional[torch.Tensor] = None  # uint8 copy of its bytes; None: zeros on wake


class RunnerSleep:
    """The sleep state of one ``ModelRunner`` (``runner.sleep_state``)."""

    def __init__(self, runner):
        self.runner = runner
        self.weights_level = 0  # 0: weights resident; 1 / 2: asleep at that level
        self.kv_asleep = False
        self._stored: list[_Stored] = []
        self._kv: Optional[tuple[int, torch.dtype]] = None  # (blocks, dtype) to reallocate
        self._snapshots = 0  # recurrent-state snapshots to reallocate (core/mamba_state.py)
        self._recapture = False  # graphs were released at sleep: capture them at wake

    @property
    def is_sleeping(self) -> bool:
        return self.weights_level > 0 or self.kv_asleep

    @torch.inference_mode()
    def sleep(self, level: int, kv_dtype: torch.dtype) -> SleepReport:
        """Put what is awake to sleep at ``level``; a part already asleep stays as it is."""
        if level not in (1, 2):
            raise ValueError(f"Sleep level must be 1 (offload weights to host memory) or 2 "
                             f"(discard weights), got {level!r}.")
        runner = self.runner
        runner.resolve_all()
        runner.backend.synchronize()
        report = SleepReport()
        self._release_graphs()
        if not self.kv_asleep:
            layers = runner.kv_layers()
            blocks = layers[0].k_cache.shape[0] if layers else 0
            report.kv_cache_bytes = blocks * runner.kv_bytes_per_block(kv_dtype)
            self._kv = (blocks, kv_dtype)
            runner.allocate_kv_cache(0, kv_dtype)  # zero-sized tensors: the cache is freed
            mamba = runner.mamba
            if mamba is not None and mamba.snapshots:  # the prefix cache's state snapshots
                self._snapshots = mamba.snapshots[0][0].shape[0]
                report.kv_cache_bytes += sum(t.nbytes for pools in mamba.snapshots for t in pools)
                mamba.allocate_snapshots(0)
            self.kv_asleep = True
        if not self.weights_level:
            self._offload(level, report)
            self.weights_level = level
        runner.backend.synchronize()
        return report

    @torch.inference_mode()
    def wake_up(self, tags: Optional[Iterable[str]] = None) -> None:
        """Bring back the parts named by ``tags`` (None: both); graphs are captured again once
        both are back."""
        tags = list(TAGS if tags is None else tags)
        unknown = [t for t in tags if t not in TAGS]
        if unknown:
            raise ValueError(f"Unknown wake_up tag(s) {unknown}; use 'weights' and/or 'kv_cache'.")
        runner = self.runner
        if "weights" in tags and self.weights_level:
            self._restore()
            self.weights_level = 0
        if "kv_cache" in tags and self.kv_asleep:
            blocks, dtype = self._kv
            runner.allocate_kv_cache(blocks, dtype)
            if self._snapshots:
                runner.mamba.allocate_snapshots(self._snapshots)  # zeroed (the prefix cache
                self._snapshots = 0  # was emptied at sleep: none is restored before a save)
            self.kv_asleep = False
        runner.backend.synchronize()
        if not self.is_sleeping and self._recapture:
            runner.capture_graphs()
            self._recapture = False

    # -- weights ---------------------------------------------------------------------------

    def _offload(self, level: int, report: SleepReport) -> None:
        pin = self.runner.device.type != "cpu"
        self._stored = []
        for st in _model_storages(self._modules()):
            storage = st.tensor.untyped_storage()
            if not storage.resizable():
                report.kept_bytes += st.nbytes
                continue
            if level == 1 or not st.is_param:
                st.host = torch.empty(st.nbytes, dtype=torch.uint8, pin_memory=pin)
                st.host.copy_(_bytes_of(storage, st.tensor.device))
                report.offloaded_bytes += st.nbytes
            else:
                report.discarded_bytes += st.nbytes
            storage.resize_(0)
            self._stored.append(st)
        if report.kept_bytes:
            logger.info("Sleep: %d bytes of model tensors live in storages that cannot be resized "
                        "(memory mappings); they stay in place.", report.kept_bytes)

    def _restore(self) -> None:
        for st in self._stored:
            storage = st.tensor.untyped_storage()
            storage.resize_(st.nbytes)
            raw = _bytes_of(storage, st.tensor.device)
            if st.host is None:
                raw.zero_()
            else:
                raw.copy_(st.host, non_blocking=True)
        self.runner.backend.synchronize()
        self._stored = []
        mark_weights_changed(self._modules())

    def _modules(self) -> list[torch.nn.Module]:
        """The target model and a draft model's (speculative decoding), if it has its own."""
        mods = [self.runner.model]
        draft = getattr(getattr(self.runner.spec, "proposer", None), "model", None)
        if isinstance(draft, torch.nn.Module) and draft is not self.runner.model:
            mods.append(draft)
        return mods

    def _release_graphs(self) -> None:
        """Captured graphs hold the old addresses: drop them (their memory too, where the graph
        runner can release it) until ``wake_up`` captures them again."""
        runner = self.runner
        if runner.graph_runner is not None and runner._graphs_ready:
            release = getattr(runner.graph_runner, "release", None)
            if release is not None:
                release()
            self._recapture = True
        runner._graphs_ready = False
        runner.verify_graphs = None
        runner.release_graph_logits()
        runner._step_tensors = None
        drafter = getattr(runner.spec, "proposer", None)
        if getattr(drafter, "graph_runner", None) is not None:  # a draft model's own graphs
            release = getattr(drafter.graph_runner, "release", None)
            if release is not None:
                release()
            drafter.graph_runner = None
            drafter._capture_tried = False  # captured again at its first draft after wake


def mark_weights_changed(modules: list[torch.nn.Module]) -> None:
    """Move every parameter's and buffer's version counter: their contents changed behind it
    (a storage refilled, a loader's copy through ``.data``), and a backend's derived copies
    keyed on the version (the cpu backend's oneDNN-packed weights) must be made again."""
    for root in modules:
        for tensor in (*root.parameters(), *root.buffers()):
            if not tensor.is_inference():
                torch.autograd.graph.increment_version(tensor)


def _model_storages(modules: list[torch.nn.Module]) -> list[_Stored]:
    """Every non-empty storage a tensor of these modules lives in, once each: parameters,
    buffers and tensor attributes (the KV cache is zero-sized by then). A storage shared by a
    parameter of the first module (the target model: ``load_weights`` refills those) counts as
    a parameter's; a draft model's own weights are always kept (nothing would refill them)."""
    found: dict[tuple, _Stored] = {}
    seen: set[int] = set()
    for index, root in enumerate(modules):
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            params = [p for p in module._parameters.values() if p is not None]
            others = [b for b in module._buffers.values() if b is not None]
            others += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
            target = index == 0
            for tensor, is_param in [(p, target) for p in params] + [(t, False) for t in others]:
                storage = tensor.untyped_storage()
                if storage.nbytes() == 0:
                    continue
                key = (tensor.device, storage.data_ptr())
                entry = found.get(key)
                if entry is None:
                    found[key] = _Stored(tensor, storage.nbytes(), is_param)
                else:
                    entry.is_param |= is_param
    return list(found.values())


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class EngineAsleepError(ValueError):
    """A request (or a weight update) reached an engine that is asleep. A ValueError, so every
    edge refuses it as bad input (the server: 503, the engine is temporarily unavailable)."""


def check_weights_awake(state: Optional[RunnerSleep]) -> None:
    if state is not None and state.weights_level:
        raise EngineAsleepError("The weights are asleep; call wake_up(tags=['weights']) before "
                                "load_weights (the KV cache may stay asleep until generation).")
