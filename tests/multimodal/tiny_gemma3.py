"""A tiny random Gemma 3 with images (SigLIP tower of 8 x 8 patches pooled to 4 x 4 = 16 soft
tokens an image, projector, two-layer Gemma 3 language model: one sliding, one full layer)
with its tokenizer and processor, built and saved offline: the reference for
tests/multimodal/test_gemma3*.py (HF transformers' greedy tokens: ``tiny_llava.hf_greedy``
with ``architecture="Gemma3ForConditionalGeneration"``)."""

from __future__ import annotations

from tests.multimodal.tiny_llava import image  # noqa: F401 (the tests' random RGB images)
from tests.tiny_tokenizer import bpe_tokenizer

SPECIAL = ["<pad>", "<bos>", "<eos>", "<start_of_image>", "<image_soft_token>", "<end_of_image>",
           "<start_of_turn>", "<end_of_turn>"]
BOI, SOFT, EOI = 3, 4, 5  # SPECIAL's ids are their indices
IMAGE_SIZE, PATCH, TOKENS = 56, 7, 16  # 8 x 8 patches, pooled 2 x 2: 16 soft tokens
PROMPT = "<start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<start_of_image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _tokenizer():
    return bpe_tokenizer(
        ["user What is this? model a cat on a mat", "Describe the image.\n\n"] * 20, SPECIAL, 300,
        CHAT_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                              "eoi_token": "<end_of_image>"})


def config(sliding_window: int = 24, num_layers: int = 2):
    """``num_layers`` text layers, sliding and full alternating."""
    from transformers import Gemma3Config

    text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_hidden_layers=num_layers, intermediate_size=128, vocab_size=320,
                max_position_embeddings=512,
                layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
                sliding_window=sliding_window, query_pre_attn_scalar=16, initializer_range=0.2,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    # An LM head of its own: tied to the scaled embeddings, a random model repeats its input.
    text["tie_word_embeddings"] = False
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=SOFT,
                        architectures=["Gemma3ForConditionalGeneration"], eos_token_id=2,
                        pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)


def make_tiny_gemma3(path: str, seed: int = 0, sliding_window: int = 24, num_layers: int = 2) -> str:
    """Saves config, float32 safetensors, tokenizer (with the chat template) and processor."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config(sliding_window, num_layers)).to(torch.float32)
    with torch.no_grad():  # random projector weights (HF zero-initializes them)
        proj = model.model.multi_modal_projector
        proj.mm_input_projection_weight.normal_(0.0, 1.0)
        proj.mm_soft_emb_norm.weight.normal_(0.0, 0.5)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    model.save_pretrained(path)
    images = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                  do_pan_and_scan=False)
    Gemma3Processor(image_processor=images, tokenizer=_tokenizer(), image_seq_length=TOKENS,
                    chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


def hf_first_logprobs(path: str, prompt: str, images: list, bidirectional: bool = True):
    """HF's log-probabilities of the token after ``prompt`` (float32), with the image block
    mask (``token_type_ids``) or, ``bidirectional=False``, causal only."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    inputs = AutoProcessor.from_pretrained(path)(text=prompt, images=images, return_tensors="pt")
    if not bidirectional:
        inputs.pop("token_type_ids")
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)
