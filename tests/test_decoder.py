"""CachedDecoder against transformers' own decoding: same logits at prefill and every step, on the
Llama-family layouts it runs (grouped-query attention, Qwen2's biases, sliding windows shorter than
the prompt), through both of its linear-layer paths (few rows and many)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from vlm.decoder import FEW_ROWS, CachedDecoder, unsupported_reason

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "qwen2-window": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1),
}


def language_model(family: str, dtype: torch.dtype = torch.float32):
    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **SMALL, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().to(dtype)
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def left_padded(rows: int, length: int = 12) -> torch.Tensor:
    """An attention mask whose rows have 4..length real tokens, left-padded."""
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, r * (length - 4) // max(rows - 1, 1) :] = 1
    return mask.flip(0)


def transformers_logits(model, embeds: torch.Tensor, mask: torch.Tensor, steps: list[torch.Tensor]):
    """Prefill + one forward per step through transformers' modules and DynamicCache."""
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache)
    logits = [out.logits[:, -1]]
    for step in steps:
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        out = model(inputs_embeds=step, attention_mask=mask, position_ids=positions, past_key_values=cache)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("rows", [3, FEW_ROWS + 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_steps_match_transformers(family, rows):
    model = language_model(family)
    assert unsupported_reason(model) is None
    mask = left_padded(rows)
    torch.manual_seed(1)
    embeds = torch.randn(rows, mask.shape[1], SMALL["hidden_size"])
    steps = [torch.randn(rows, 1, SMALL["hidden_size"]) for _ in range(4)]
    with torch.no_grad():
        expected = transformers_logits(model, embeds, mask, steps)
        decoder = CachedDecoder(model, rows, mask.shape[1], len(steps))
        got = [decoder.prefill(embeds, mask)] + [decoder.step(step) for step in steps]
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"step {step}")
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_bfloat16_matches_transformers_within_its_rounding():
    model = language_model("mistral-window", torch.bfloat16)
    mask = left_padded(3)
    torch.manual_seed(1)
    embeds = torch.randn(3, mask.shape[1], SMALL["hidden_size"], dtype=torch.bfloat16)
    steps = [torch.randn(3, 1, SMALL["hidden_size"], dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        expected = transformers_logits(model, embeds, mask, steps)
        decoder = CachedDecoder(model, 3, mask.shape[1], len(steps))
        got = [decoder.prefill(embeds, mask)] + [decoder.step(step) for step in steps]
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_models_it_does_not_run_are_named_with_the_reason():
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2))
    assert "model_type 'gpt2'" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="CachedDecoder cannot run this language model: model_type 'gpt2'"):
        CachedDecoder(gpt2, 1, 4, 1)
    lora = get_peft_model(language_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert unsupported_reason(lora.base_model.model).startswith("self_attn.q_proj is a peft.tuners.lora")


def test_shapes_beyond_the_cache_are_errors_that_say_so():
    model = language_model("llama")
    decoder = CachedDecoder(model, 2, 6, 1)
    with pytest.raises(ValueError, match="do not fit a decoder built for 2 rows of 7 cache slots"):
        decoder.prefill(torch.randn(2, 8, SMALL["hidden_size"]), torch.ones(2, 8, dtype=torch.long))
    with torch.no_grad():
        decoder.prefill(torch.randn(2, 6, SMALL["hidden_size"]), torch.ones(2, 6, dtype=torch.long))
        decoder.step(torch.randn(2, 1, SMALL["hidden_size"]))
        with pytest.raises(
            ValueError, match="cache of 7 slots is full: build it with a larger max_new_tokens"
        ):
            decoder.step(torch.randn(2, 1, SMALL["hidden_size"]))
