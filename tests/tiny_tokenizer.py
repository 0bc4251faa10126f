"""The tests' tiny tokenizers: byte-level BPE trained here on a few lines of text, so no
tokenizer is downloaded; the special tokens take ids 0, 1, ... in the order given."""

from __future__ import annotations


def train_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int):
    """A ``tokenizers.Tokenizer``: every byte, ``special_tokens`` and the merges learned from
    ``corpus`` up to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def bpe_tokenizer(corpus: list[str], special_tokens: list[str], vocab_size: int,
                  chat_template: str | None = None, **roles):
    """``train_bpe``'s tokenizer as a ``PreTrainedTokenizerFast``; ``roles``: its keyword
    arguments (``bos_token="<s>"``, ``extra_special_tokens={...}``, ...)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=train_bpe(corpus, special_tokens, vocab_size), **roles)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
