"""The tiny packaged tokenizer: loads offline, special tokens never split, exact round trips, reproducible."""

from __future__ import annotations

import pytest

from vlm.processing import tokenizer as tiny
from vlm.processing.tokenizer import SPECIAL_TOKENS, TINY_TOKENIZER_DIR, load_tiny_tokenizer

SENTENCES = [
    "A small red circle left of a blue square.",
    "User: How many green triangles are there?\nAssistant: Three.",
    "User:<image>What does the sign say?<end_of_utterance>\nAssistant: STOP<end_of_utterance>\n",
    "Total: 1,234.56 dollars on 2024-05-17 (page 3 of 12)",
    "<fake_token_around_image><row_1_col_2><image><image>\n\n<fake_token_around_image><global-img><image>",
    "Unseen words: zygote, quixotic, café, naïve, 東京, emoji 🐱 and  double  spaces\ttabs",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def test_loads_with_special_tokens_set(tokenizer):
    assert len(tokenizer) == tiny.DEFAULT_VOCAB_SIZE
    named = ["unk", "bos", "eos", "pad"]
    assert [getattr(tokenizer, f"{name}_token") for name in named] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [getattr(tokenizer, f"{name}_token_id") for name in named] == [0, 1, 2, 3]
    assert tokenizer("a cat").input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_tokens_are_single_ids(tokenizer, token):
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert token_id == SPECIAL_TOKENS.index(token)
    assert tokenizer(f"x{token}y", add_special_tokens=False).input_ids[1] == token_id
    assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
    assert token in tokenizer.all_special_tokens


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_digits_split_and_task_words_whole(tokenizer):
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]
    for word in [
        " circle",
        " triangle",
        " purple",
        " many",
        " shapes",
        " Yes",
        "How",
        "What",
        "User",
        "Assistant",
    ]:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_assets_are_small():
    files = list(TINY_TOKENIZER_DIR.iterdir())
    assert {f.name for f in files} == {"tokenizer.json", "tokenizer_config.json"}
    assert sum(f.stat().st_size for f in files) < 300_000


def test_regenerating_the_assets_gives_the_stored_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "TINY_TOKENIZER_DIR", tmp_path)
    tiny.main()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
