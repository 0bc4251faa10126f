"""Custom logits processors the tests give the engine by class or by name
(``tests.sampling.logits_procs:DummyLogitsProcessor``): vLLM's example processors with the one
import line changed, and two more (one that raises, one that keeps the argmax)."""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.sample.logits_processor import (AdapterLogitsProcessor, BatchUpdate, LogitsProcessor,
                                              process_dict_updates)


class DummyLogitsProcessor(LogitsProcessor):
    """vLLM's example: a request whose extra_args has ``target_token`` samples only that token."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.req_info: dict[int, int] = {}
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.updates: list[Optional[BatchUpdate]] = []  # what update_state was told, for the tests

    @classmethod
    def validate_params(cls, params) -> None:
        target = (params.extra_args or {}).get("target_token")
        if target is not None and (not isinstance(target, int) or target < 0):
            raise ValueError(f"target_token must be a non-negative integer, got {target!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        self.updates.append(batch_update)
        process_dict_updates(self.req_info, batch_update,
                             lambda params, _, __: params.extra_args and params.extra_args.get("target_token"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.req_info:
            return logits
        rows = torch.tensor(list(self.req_info), dtype=torch.long, device=logits.device)
        cols = torch.tensor(list(self.req_info.values()), dtype=torch.long, device=logits.device)
        keep = logits[rows, cols].clone()
        logits[rows] = float("-inf")
        logits[rows, cols] = keep
        return logits


class DummyPerReqLogitsProcessor:
    """vLLM's request-level example: every logit but ``target_token``'s to -inf."""

    def __init__(self, target_token: int):
        self.target_token = target_token

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        keep = logits[self.target_token].item()
        logits[:] = float("-inf")
        logits[self.target_token] = keep
        return logits


class WrappedPerReqLogitsProcessor(AdapterLogitsProcessor):
    """vLLM's AdapterLogitsProcessor example."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        if not params.extra_args or "target_token" not in params.extra_args:
            return None
        return DummyPerReqLogitsProcessor(params.extra_args["target_token"])


class AlternatingPerReqProcessor(AdapterLogitsProcessor):
    """Request-level, reading the prompt and the output so far: after an even number of output
    tokens only the prompt's first token may come, after an odd number only its last."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        if not (params.extra_args or {}).get("alternate"):
            return None

        def alternate(prompt_ids, output_ids, logits):
            token = prompt_ids[0] if len(output_ids) % 2 == 0 else prompt_ids[-1]
            out = torch.full_like(logits, float("-inf"))
            out[token] = 0.0
            return out  # a new tensor: the adapter writes it into the row

        return alternate


class _FlaggedRows(LogitsProcessor):
    """The rows whose request's extra_args carry ``FLAG`` true (``self.rows``)."""

    FLAG = ""
    ARGMAX_INVARIANT = False

    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, bool] = {}

    def is_argmax_invariant(self) -> bool:
        return self.ARGMAX_INVARIANT

    def update_state(self, batch_update) -> None:
        process_dict_updates(self.rows, batch_update,
                             lambda params, _, __: True if (params.extra_args or {}).get(self.FLAG) else None)


class RaisingProcessor(_FlaggedRows):
    """Raises in apply while a request with extra_args {"boom": true} is in the batch."""

    FLAG = "boom"

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("boom")
        return logits


class TopTwoProcessor(_FlaggedRows):
    """Argmax-invariant: a request with extra_args {"top_two": true} samples among its two most
    likely tokens only (after temperature, as vLLM applies such processors)."""

    FLAG = "top_two"
    ARGMAX_INVARIANT = True

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        self.applied = 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.applied += 1
        for row in self.rows:
            third = logits[row].topk(3).values[-1]
            logits[row] = logits[row].masked_fill(logits[row] <= third, float("-inf"))
        return logits


class NoneReturningProcessor(_FlaggedRows):
    """A buggy processor: ``apply`` forgets to return the logits while a request with
    extra_args {"forget": true} is in the batch."""

    FLAG = "forget"

    def apply(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        if self.rows:
            logits[:, 0] = 0.0  # edits in place, then returns nothing
            return None
        return logits


class FlatteningProcessor(_FlaggedRows):
    """Argmax-invariant: a request with extra_args {"flatten": true} has its (temperature-scaled)
    logits divided by 100, nearly uniform over the tokens still allowed."""

    FLAG = "flatten"
    ARGMAX_INVARIANT = True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row in self.rows:
            logits[row] /= 100.0
        return logits


class NanProcessor(_FlaggedRows):
    """A broken processor: the rows of a request with extra_args {"nan": true} get a NaN logit
    (token 0's), as a model with an overflow would give them."""

    FLAG = "nan"

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row in self.rows:
            logits[row, 0] = float("nan")
        return logits
