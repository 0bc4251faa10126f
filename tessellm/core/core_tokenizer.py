"""``set_tokenizer`` across processes: the engine cores compile grammars against a tokenizer the
front end names.

A data-parallel front end (``DPLLMEngine``) holds its tokenizer in its own process, and only
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


def set_core_tokenizer(core, name: str) -> dict:
    """In the core process: grammars of requests added from now on are compiled against the
    tokenizer ``name``; the answer is its vocabulary's digest, or why it could not be loaded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - a bad name is the caller's refusal, not a dead core
        why = (str(exc).strip().splitlines() or [""])[0]
        return {"error": f"the tokenizer {name!r} could not be loaded: {type(exc).__name__}: {why}"}
    core.structured.set_tokenizer(tokenizer)
    return {"result": vocabulary_digest(tokenizer)}
