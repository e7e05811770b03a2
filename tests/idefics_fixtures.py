"""Tiny random transformers Idefics2/Idefics3 models, a mixed batch and the released chat templates,
shared by the parity tests."""

from __future__ import annotations

import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
)

# The ``chat_template`` of the released processors, copied from their processor_config.json on the hub
# (HuggingFaceM4/idefics2-8b, the same in idefics2-8b-chatty; HuggingFaceM4/Idefics3-8B-Llama3): the
# reference our template must render like, written here so the test needs no download.
RELEASED_IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAMA3_BOS = "<|begin_of_text|>"
RELEASED_IDEFICS3_CHAT_TEMPLATE = LLAMA3_BOS + RELEASED_IDEFICS2_CHAT_TEMPLATE

PATCH = 8
TEXT = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=PATCH,
)
IMAGE_TOKEN_ID = 97


def tiny_idefics2() -> Idefics2ForConditionalGeneration:
    """Idefics2 with a Mistral text model, perceiver of 2 layers x 8 latents."""
    torch.manual_seed(0)
    config = Idefics2Config(
        text_config=dict(model_type="mistral", **TEXT),
        vision_config=VISION,
        perceiver_config=dict(
            hidden_size=TEXT["hidden_size"],
            resampler_n_latents=8,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=16,
            num_key_value_heads=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
    )
    model = Idefics2ForConditionalGeneration(config).eval()
    randomise_weights(model)
    return model


def tiny_idefics3(tie_word_embeddings: bool = False) -> Idefics3ForConditionalGeneration:
    """Idefics3 with a Llama text model and pixel shuffle 2 (SmolVLM-style with tied embeddings)."""
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config=dict(model_type="llama", **dict(TEXT, tie_word_embeddings=tie_word_embeddings)),
        vision_config=VISION,
        scale_factor=2,
        image_token_id=IMAGE_TOKEN_ID,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    randomise_weights(model)
    return model


def randomise_weights(model: torch.nn.Module) -> None:
    """Give every weight a random value of unit-scale effect.

    The default init (std 0.02, constant norms and latents) leaves the logits almost blind to the
    images (a change of ~1e-4), which would let a parity test pass with the images ignored.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "latents" in name:
                param.add_(torch.randn_like(param) * 0.3)
            else:
                param.normal_(0.0, 0.15)


def mixed_batch(tokens_per_image: int, size: int = 48) -> dict[str, torch.Tensor]:
    """Three rows: two images of different aspect ratios, one square image, text only (right padding).

    Images are zero-padded to ``size`` x ``size`` with a pixel mask, as the transformers processors do.
    """
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.zeros(3, 2, 3, size, size)
    pixel_mask = torch.zeros(3, 2, size, size, dtype=torch.long)
    for row, img, h, w in [(0, 0, 30, 45), (0, 1, 48, 21), (1, 0, size, size)]:
        pixel_values[row, img, :, :h, :w] = torch.randn(3, h, w, generator=g)
        pixel_mask[row, img, :h, :w] = 1

    def text(n: int) -> list[int]:
        return torch.randint(3, 90, (n,), generator=g).tolist()

    image = [IMAGE_TOKEN_ID] * tokens_per_image
    rows = [
        text(3) + image + text(4) + image + text(2),
        text(5) + image + text(6),
        text(7),
    ]
    length = max(map(len, rows))
    input_ids = torch.zeros(3, length, dtype=torch.long)
    attention_mask = torch.zeros(3, length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | (input_ids == IMAGE_TOKEN_ID), -100)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        pixel_attention_mask=pixel_mask,
        labels=labels,
    )


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same prompts left-padded, as generation needs."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    new_ids, new_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        new_ids[i, ids.shape[1] - n :] = ids[i, :n]
        new_mask[i, ids.shape[1] - n :] = 1
    return dict(batch, input_ids=new_ids, attention_mask=new_mask)
