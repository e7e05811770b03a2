"""Language model wrapper: special tokens of the recipes added, embeddings resized, local checkpoints load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from vlm.config import END_OF_UTTERANCE_TOKEN, IMAGE_TOKEN, RECIPE_SPECIAL_TOKENS, LanguageConfig, get_preset
from vlm.language_model import build_language_model, load_tokenizer
from vlm.model import VisionLanguageModel

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def word_tokenizer(n_words: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def test_without_tokenizer_special_tokens_follow_the_configured_vocabulary():
    model, ids = build_language_model(LanguageConfig("llama", dict(SMALL)))
    assert ids == {tok: 100 + i for i, tok in enumerate(RECIPE_SPECIAL_TOKENS)}
    assert model.get_input_embeddings().num_embeddings == 103
    assert model.get_output_embeddings().out_features == 103


def test_tokenizer_gets_missing_special_tokens_and_embeddings_are_resized():
    tokenizer = word_tokenizer(100)
    model, ids = build_language_model(LanguageConfig("llama", dict(SMALL)), tokenizer)
    assert len(tokenizer) == 103
    assert model.get_input_embeddings().num_embeddings == 103
    assert tokenizer.convert_ids_to_tokens(ids[IMAGE_TOKEN]) == IMAGE_TOKEN
    # special tokens are never split and keep their ids
    encoded = tokenizer(f"w5 {IMAGE_TOKEN}{END_OF_UTTERANCE_TOKEN}", add_special_tokens=False).input_ids
    assert encoded == [5, ids[IMAGE_TOKEN], ids[END_OF_UTTERANCE_TOKEN]]
    # a second build finds them present and adds nothing
    _, again = build_language_model(LanguageConfig("llama", dict(SMALL)), tokenizer)
    assert again == ids and len(tokenizer) == 103


def test_local_pretrained_checkpoint_loads_with_its_tokenizer(tmp_path):
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMALL))
    saved.save_pretrained(tmp_path)
    word_tokenizer(100).save_pretrained(tmp_path)

    config = dataclasses.replace(
        get_preset("idefics2-tiny"), language=LanguageConfig(pretrained=str(tmp_path))
    )
    model = VisionLanguageModel(config, tokenizer=load_tokenizer(tmp_path))
    embeddings = model.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] == 103
    assert torch.equal(embeddings[:100], saved.get_input_embeddings().weight)
    assert model.image_token_id == 101

    with pytest.raises(ValueError, match="needs its tokenizer"):
        VisionLanguageModel(config)
