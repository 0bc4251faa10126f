"""Custom logits processors, vLLM v1's interface (docs/logits_processors.md).

A processor written for vLLM changes one import line::

    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor   # vLLM
    from tessellm.sample.logits_processor import BatchUpdate, LogitsProcessor  # tessellm

and is given to the engine as vLLM's: ``LLM(logits_processors=[Cls])``, ``tessellm serve
--logits-processors module:Cls``, or an entry point in the ``tessellm.logits_processors`` (or
``vllm.logits_processors``) group. Per-request arguments come in ``SamplingParams.extra_args``
(the server's ``vllm_xargs``).
"""

from tessellm.sample.logits_processor.adapter import AdapterLogitsProcessor, RequestLogitsProcessor
from tessellm.sample.logits_processor.builtin import process_dict_updates
from tessellm.sample.logits_processor.interface import (AddedRequest, BatchUpdate, LogitsProcessor,
                                                        MovedRequest, MoveDirectionality,
                                                        RemovedRequest)
from tessellm.sample.logits_processor.load import GROUPS

LOGITSPROCS_GROUP = GROUPS[1]  # vLLM's name for its entry point group

__all__ = ["AdapterLogitsProcessor", "AddedRequest", "BatchUpdate", "LogitsProcessor", "LOGITSPROCS_GROUP",
           "MovedRequest", "MoveDirectionality", "RemovedRequest", "RequestLogitsProcessor",
           "process_dict_updates"]
