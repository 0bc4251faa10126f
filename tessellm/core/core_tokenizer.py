"""``set_tokenizer`` across processes: the engine cores compile grammars against a tokenizer the
front end names.

A front end whose cores run in other processes (``DPLLMEngine``; ``AsyncLLM``, the server's)
holds its tokenizer in its own process, and only
msgpack crosses to the cores, so a tokenizer object cannot. What can cross is its name (a
directory or a Hugging Face name: ``tokenizer.name_or_path``)::

    front end: set_tokenizer(tok) --["call", id, "set_tokenizer", [name]]--> each core
               core: AutoTokenizer.from_pretrained(name) -> structured.set_tokenizer
               <--["call_result", id, {"result": digest} | {"error": why}]--

Invariant: the front end lets constrained requests through only when every core answered with
the digest of the very vocabulary it holds (``vocabulary_digest``), so a name that loads another
vocabulary (a tokenizer changed in memory after loading, say) never constrains to wrong ids.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from tessellm.core.scheduler_config import RequestParamError

# While the cores load a new tokenizer, the front end already tokenizes with it but a grammar
# compiled now would be the old vocabulary's: constrained requests are refused (503, retry).
LOADING_REFUSAL = ("structured_outputs: the engine is loading a new tokenizer (set_tokenizer) and cannot "
                   "constrain output to its vocabulary yet; retry in a moment (requests without "
                   "structured outputs are served meanwhile).")


class TokenizerLoadingError(RequestParamError):
    """A constrained request added while ``set_tokenizer`` waits for the cores: a temporary
    refusal (the server answers 503, code "tokenizer_loading"), not bad input."""


def tokenizer_name(tokenizer) -> Optional[str]:
    """The name another process can load ``tokenizer`` by, or None (one built in memory)."""
    name = getattr(tokenizer, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def vocabulary_digest(tokenizer) -> Optional[str]:
    """A digest of the token -> id map: equal digests, grammars valid for both (None: no map)."""
    if not hasattr(tokenizer, "get_vocab"):
        return None
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_fits(tokenizer, vocab_size: int) -> None:
    """``set_tokenizer``'s check: the tokenizer's ids must be the model's."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if size is not None and size > vocab_size:
        raise ValueError(f"set_tokenizer: the tokenizer has {size} tokens, over the model's vocabulary "
                         f"of {vocab_size}; give the model's tokenizer (or one with its ids).")


def use_front_tokenizer(front, tokenizer) -> None:
    """A front end (``tokenizer``, ``inputs``, ``outputs``, ``info``) tokenizes and detokenizes
    requests added from now on with ``tokenizer``; a vision model's chat template is adopted by
    it as by the model's own. Grammars are the caller's (``CoreTokenizer`` across processes)."""
    check_fits(tokenizer, front.info.vocab_size)
    front.tokenizer = front.inputs.tokenizer = front.outputs.tokenizer = tokenizer
    if front.info.mm_limits:
        from tessellm.multimodal.processor import adopt_chat_template

        adopt_chat_template(tokenizer, front.info)


class CoreTokenizer:
    """What the cores (other processes) compile grammars against, as the front end knows it.

    ``ask(tokenizer)``: the ``set_tokenizer`` call's arguments for the cores, or None when there
    is nothing to ask (they hold its vocabulary already, or it has no name to load it by);
    the front end sends the call to every core and gives their answers to ``settle``, which
    returns the refusal for constrained requests (None: they may go)."""

    def __init__(self, tokenizer, hint: str = ""):
        self.held = tokenizer  # None when a core may hold another vocabulary than any we know
        self.hint = hint  # the refusal's last words: another way out on this kind of engine
        self._before = None  # ``held`` before the call in flight: theirs again if every core kept it

    def ask(self, tokenizer) -> Optional[list]:
        from tessellm.structured_output.compiler import same_vocabulary

        if self.held is not None and same_vocabulary(self.held, tokenizer):
            return None
        name, digest = tokenizer_name(tokenizer), vocabulary_digest(tokenizer)
        if name is None or digest is None:
            return None
        # unknown until ``settle``: a call never settled (the caller cancelled, a core died)
        # may still be carried out by the cores
        self._before, self.held = self.held, None
        return [name]

    def settle(self, tokenizer, answers: Optional[list[dict]], core_names: list[str]) -> Optional[str]:
        """``answers``: each core's to ``ask``'s call, in core order (None: not asked)."""
        from tessellm.structured_output.compiler import same_vocabulary

        if answers is None:
            if self.held is not None and same_vocabulary(self.held, tokenizer):
                return None
            return self._refusal("it has no name (name_or_path) to load it by: save it (save_pretrained(DIR)) "
                                 "and set AutoTokenizer.from_pretrained(DIR)")
        if all(a.get("kept") for a in answers):  # every core refused it and kept its own
            self.held = self._before
        errors = [f"{name}: {a['error']}" for name, a in zip(core_names, answers) if "error" in a]
        if not errors and all(a["result"] == vocabulary_digest(tokenizer) for a in answers):
            self.held = tokenizer
            return None
        return self._refusal(errors[0] if errors else
                             f"{tokenizer_name(tokenizer)!r} loads another vocabulary than the tokenizer given")

    def _refusal(self, why: str) -> str:
        return ("structured_outputs: set_tokenizer gave a tokenizer whose vocabulary differs from the "
                f"engine cores', and the cores (other processes) load it by name: {why}. Set one loadable "
                f"by name, or set the model's tokenizer again{self.hint}.")


def set_core_tokenizer(core, name: str) -> dict:
    """In the core process: grammars of requests added from now on are compiled against the
    tokenizer ``name``; the answer is its vocabulary's digest, or why it could not be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - a bad name is the caller's refusal, not a dead core
        why = (str(exc).strip().splitlines() or [""])[0]
        return {"error": f"the tokenizer {name!r} could not be loaded: {type(exc).__name__}: {why}",
                "kept": True}  # its tokenizer unchanged (CoreTokenizer.settle)
    core.structured.set_tokenizer(tokenizer)
    return {"result": vocabulary_digest(tokenizer)}
