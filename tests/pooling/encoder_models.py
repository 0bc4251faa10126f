"""Tiny random encoder checkpoints (BERT, XLM-RoBERTa, and their sequence classifiers), built
here from configs and saved as float32 safetensors with a tokenizer, and the HF references."""

from __future__ import annotations

import os

WORDS = ("the cat sat on mat a query about embeddings and vectors quick brown fox jumps over "
         "lazy dog small feline what is").split()
ENCODER = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, hidden_act="gelu")


def bert_tokenizer(path: str):
    """A WordPiece BERT tokenizer ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4): text pairs
    get token types 0 / 1, as bert-base's do."""
    from transformers import BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=vocab)


def make_encoder(root: str, kind: str, num_labels: int = 0, max_positions: int = 128) -> str:
    """``kind`` "bert" or "xlmr"; ``num_labels`` 0: the bare model, else a classifier."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertModel, XLMRobertaConfig,
                              XLMRobertaForSequenceClassification, XLMRobertaModel)

    path = os.path.join(root, f"{kind}-{num_labels}")
    if os.path.isdir(path):
        return path
    if kind == "bert":
        config = BertConfig(**ENCODER, max_position_embeddings=max_positions, type_vocab_size=2,
                            pad_token_id=0)
        cls = BertForSequenceClassification if num_labels else BertModel
    else:  # XLM-R: positions from padding_idx + 1, one token type
        config = XLMRobertaConfig(**ENCODER, max_position_embeddings=max_positions + 2,
                                  type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        cls = XLMRobertaForSequenceClassification if num_labels else XLMRobertaModel
    if num_labels:
        config.num_labels = num_labels
    torch.manual_seed(11 + num_labels)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # HF's init (std 0.02) makes every token look alike: spread them
        for name, p in model.named_parameters():
            if "embeddings" in name or "classifier" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    if kind == "bert":
        bert_tokenizer(path).save_pretrained(path)
    else:
        from tests.pooling.conftest import save_tokenizer

        save_tokenizer(path)
    return path


def hf_hidden(path: str, ids: list[int], token_types=None):
    """HF's last hidden state of one prompt (no padding, every token attended)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        kw = {} if token_types is None else {"token_type_ids": torch.tensor([token_types])}
        return model(torch.tensor([ids]), **kw).last_hidden_state[0]


def hf_pair_logits(path: str, pairs: list[tuple[str, str]]):
    """HF ``*ForSequenceClassification`` on the tokenizer's text pairs (token types included)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(**tok(q, d, return_tensors="pt")).logits[0] for q, d in pairs])
