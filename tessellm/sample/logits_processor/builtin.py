"""Helpers for processors that keep per-request state in a dict keyed by batch index (vLLM's
``vllm.v1.sample.logits_processor.builtin.process_dict_updates``)."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from tessellm.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

T = TypeVar("T")


def process_dict_updates(entries: dict[int, T], batch_update: Optional[BatchUpdate],
                         new_state: Callable[..., Optional[T]]) -> bool:
    """Apply ``batch_update`` to ``entries`` (index -> state): removed indices dropped, each
    added request's state from ``new_state(params, prompt_ids, output_ids)`` (None: the
    processor does not apply to it, and any old entry at its index goes), moves and swaps
    carried out. True if ``entries`` changed."""
    if not batch_update:
        return False
    changed = False
    for index in batch_update.removed:
        changed |= entries.pop(index, None) is not None
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            entries[index] = state
            changed = True
        else:
            changed |= entries.pop(index, None) is not None
    for a, b, how in batch_update.moved:
        a_state, b_state = entries.pop(a, None), entries.pop(b, None)
        if a_state is not None:
            entries[b] = a_state
        if how is MoveDirectionality.SWAP and b_state is not None:
            entries[a] = b_state
        changed |= a_state is not None or b_state is not None
    return changed
