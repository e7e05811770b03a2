"""Text processing: image-token expansion and chat template equal transformers' Idefics processors;
labels (SFT / pretraining) and multi-turn shuffling."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
import torch
from idefics_fixtures import LLAMA3_BOS, RELEASED_IDEFICS2_CHAT_TEMPLATE, RELEASED_IDEFICS3_CHAT_TEMPLATE
from PIL import Image
from transformers import (
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
)

from vlm.config import END_OF_UTTERANCE_TOKEN, FAKE_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN
from vlm.processing.text import (
    apply_chat_template,
    build_labels,
    expand_image_tokens,
    image_placeholder_token_ids,
    image_prompt,
    render_conversation,
    shuffle_turns,
    turns_to_messages,
)
from vlm.processing.tokenizer import load_tiny_tokenizer


class Layout(NamedTuple):
    rows: int = 0
    cols: int = 0
    n_tiles: int = 1


IDEFICS2_TEXTS = [
    "<image>",
    "<image>A photo of a cat.",  # a word glued to the closing fake token gets a space
    "<image><image>Two images<image> and one more.\n<image>",  # adjacent images, newline
    "User:<image>What is this?<end_of_utterance>\nAssistant:",
]
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And here"},
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "how many stars?"},
        ],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    {"role": "user", "content": "Thanks! Which is bigger?"},
    {"role": "assistant", "content": "The second one."},
]
ANSWERS = ["A red circle.", "3", "The second one."]


@pytest.fixture
def tokenizer():
    # Fresh per test: the transformers processors add their special tokens to the tokenizer they get.
    return load_tiny_tokenizer()


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 30 * i, 30 + 20 * (i % 2)), (40 * i, 100, 200)) for i in range(n)]


def idefics2_processor(tokenizer, split: bool, image_seq_len: int = 3) -> Idefics2Processor:
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=split, size={"longest_edge": 32, "shortest_edge": 16}
    )
    return Idefics2Processor(image_processor, tokenizer, image_seq_len=image_seq_len)


# --- expansion ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("text", IDEFICS2_TEXTS)
def test_idefics2_expansion_matches_transformers(tokenizer, split, text):
    processor = idefics2_processor(tokenizer, split)
    n = text.count(IMAGE_TOKEN)
    expected = processor(text=text, images=images(n))["input_ids"][0]
    expanded = expand_image_tokens(text, [Layout(n_tiles=5 if split else 1)] * n, "idefics2", 3)
    assert tokenizer(expanded).input_ids == expected
    assert expanded.count(IMAGE_TOKEN) == 3 * n * (5 if split else 1)


def test_idefics2_expansion_strings():
    one = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * 2}{FAKE_IMAGE_TOKEN}"
    assert expand_image_tokens("<image>Hi", [Layout()], "idefics2", 2) == f"{one} Hi"
    assert expand_image_tokens("<image> Hi", [Layout()], "idefics2", 2) == f"{one} Hi"
    two = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * 2}{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * 2}{FAKE_IMAGE_TOKEN}"
    assert expand_image_tokens("<image><image>", [Layout(), Layout()], "idefics2", 2) == two
    assert expand_image_tokens("<image>", [Layout(n_tiles=2)], "idefics2", 2) == two


@pytest.mark.parametrize("grid", [(0, 0), (1, 1), (1, 4), (2, 3), (6, 6)])
def test_idefics3_image_prompt_matches_transformers(tokenizer, grid):
    processor = Idefics3Processor(Idefics3ImageProcessorPil(), tokenizer, image_seq_len=4)
    rows, cols = grid
    expected = processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
    assert image_prompt(Layout(rows, cols), "idefics3", 4) == expected


@pytest.mark.parametrize("sizes", [(96, 32), (64, 32), (32, 32)])
def test_idefics3_expansion_matches_transformers_end_to_end(tokenizer, sizes):
    longest_edge, tile = sizes
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=2)
    text = "User:<image>What is it?<image>and this<end_of_utterance>\nAssistant:"
    pictures = [Image.new("RGB", (100, 60)), Image.new("RGB", (30, 90))]
    expected = processor(text=text, images=pictures)["input_ids"][0]
    grid = image_processor(pictures, return_row_col_info=True)
    layouts = [Layout(r, c) for r, c in zip(grid["rows"][0], grid["cols"][0])]
    assert tokenizer(expand_image_tokens(text, layouts, "idefics3", 2)).input_ids == expected


def test_idefics3_expansion_string():
    tile = IMAGE_TOKEN * 2
    expected = (
        f"x{FAKE_IMAGE_TOKEN}<row_1_col_1>{tile}{FAKE_IMAGE_TOKEN}<row_1_col_2>{tile}\n"
        f"{FAKE_IMAGE_TOKEN}<row_2_col_1>{tile}{FAKE_IMAGE_TOKEN}<row_2_col_2>{tile}\n"
        f"\n{FAKE_IMAGE_TOKEN}<global-img>{tile}{FAKE_IMAGE_TOKEN}y"
        f"{FAKE_IMAGE_TOKEN}<global-img>{tile}{FAKE_IMAGE_TOKEN}"
    )
    assert expand_image_tokens("x<image>y<image>", [Layout(2, 2), Layout(0, 0)], "idefics3", 2) == expected


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_cross_attention_keeps_one_marker_per_image(recipe):
    text = "<image>A cat.<image><image>Two more."
    layouts = [Layout(2, 2, 5)] * 3
    assert expand_image_tokens(text, layouts, recipe, 64, fusion="cross_attention") == text


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
def test_placeholder_and_image_counts_must_match(fusion):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\).*each <image>"):
        expand_image_tokens("<image>a<image>", [Layout()], "idefics2", 4, fusion)
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image"):
        expand_image_tokens("no image here", [Layout()], "idefics3", 4, fusion)


# --- chat template --------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("n_messages", [2, 3, 5, 7])
@pytest.mark.parametrize("released", ["idefics2", "idefics3"])
def test_chat_template_matches_the_released_processors(
    tokenizer, released, add_generation_prompt, n_messages
):
    if released == "idefics2":
        processor = Idefics2Processor(
            Idefics2ImageProcessorPil(), tokenizer, chat_template=RELEASED_IDEFICS2_CHAT_TEMPLATE
        )
    else:
        processor = Idefics3Processor(
            Idefics3ImageProcessorPil(), tokenizer, chat_template=RELEASED_IDEFICS3_CHAT_TEMPLATE
        )
    messages = CONVERSATION[:n_messages]
    # transformers' template needs list contents; ours also takes plain strings.
    as_lists = [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in messages
    ]
    expected = processor.apply_chat_template(
        as_lists, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # Idefics3's template writes Llama 3's BOS itself; our text leaves it to the tokenizer, which adds it.
    assert apply_chat_template(messages, add_generation_prompt) == expected.removeprefix(LLAMA3_BOS)


def test_chat_template_format():
    rendered = apply_chat_template(CONVERSATION[1:5], add_generation_prompt=True)
    assert rendered == (
        "User:<image>What shape is it?<end_of_utterance>\nAssistant: A red circle.<end_of_utterance>\n"
        "User: And here<image><image>how many stars?<end_of_utterance>\nAssistant: 3<end_of_utterance>\n"
        "Assistant:"
    )


def test_turns_to_messages_render_like_image_items():
    messages = turns_to_messages([("<image>What is it?", "A dog."), ("And <image>?", "A cat.")])
    assert apply_chat_template(messages) == (
        "User:<image>What is it?<end_of_utterance>\nAssistant: A dog.<end_of_utterance>\n"
        "User: And <image>?<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\n"
    )


@pytest.mark.parametrize(
    ("recipe", "layouts"),
    [
        ("idefics2", [Layout(n_tiles=1)] * 3),
        ("idefics2", [Layout(n_tiles=5)] * 3),
        ("idefics3", [Layout(2, 3), Layout(0, 0), Layout(1, 2)]),
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_conversation_text_and_answer_spans(recipe, layouts, add_generation_prompt):
    rendered = render_conversation(
        CONVERSATION, add_generation_prompt, layouts=layouts, recipe=recipe, image_seq_len=3
    )
    whole = apply_chat_template(CONVERSATION, add_generation_prompt)
    assert rendered.text == expand_image_tokens(whole, layouts, recipe, 3)
    answers = [rendered.text[start:end] for start, end in rendered.answer_spans]
    assert answers == [f" {answer}{END_OF_UTTERANCE_TOKEN}" for answer in ANSWERS]


def test_render_conversation_without_layouts_and_count_check():
    rendered = render_conversation(CONVERSATION)
    assert rendered.text == apply_chat_template(CONVERSATION)
    with pytest.raises(ValueError, match=r"3 <image> placeholder\(s\) but 2 image\(s\)"):
        render_conversation(CONVERSATION, layouts=[Layout(), Layout()])


# --- labels ---------------------------------------------------------------------------------


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled (not ignored) token ids."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token in labels.tolist():
        if token != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = token
    return runs


def encode_conversations(tokenizer, padding_side: str, recipe: str):
    conversations = [CONVERSATION, CONVERSATION[1:3]]
    layouts = [[Layout(2, 2, 5)] * 3, [Layout(1, 3, 5)]]
    rendered = [
        render_conversation(messages, layouts=layout, recipe=recipe, image_seq_len=3)
        for messages, layout in zip(conversations, layouts)
    ]
    tokenizer.padding_side = padding_side
    batch = tokenizer(
        [r.text for r in rendered], padding=True, return_offsets_mapping=True, return_tensors="pt"
    )
    return rendered, batch


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_sft_labels_only_on_answers_and_their_end_token(tokenizer, padding_side, recipe):
    rendered, batch = encode_conversations(tokenizer, padding_side, recipe)
    labels = build_labels(
        batch.input_ids,
        batch.attention_mask,
        image_placeholder_token_ids(tokenizer),
        mode="sft",
        offset_mapping=batch.offset_mapping,
        answer_spans=[r.answer_spans for r in rendered],
    )
    for row, answers in enumerate([ANSWERS, ANSWERS[:1]]):
        decoded = [tokenizer.decode(run) for run in labelled_runs(labels[row])]
        assert decoded == [f" {answer}{END_OF_UTTERANCE_TOKEN}" for answer in answers]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], batch.input_ids[kept])


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_pretraining_labels_skip_only_padding_and_image_tokens(tokenizer, recipe):
    _, batch = encode_conversations(tokenizer, "right", recipe)
    placeholders = image_placeholder_token_ids(tokenizer)
    assert len(placeholders) == 3 + 36  # <image>, <fake_token_around_image>, <global-img>, 6x6 tile tags
    labels = build_labels(batch.input_ids, batch.attention_mask, placeholders)
    is_placeholder = torch.isin(batch.input_ids, torch.tensor(placeholders))
    ignored = is_placeholder | (batch.attention_mask == 0)
    assert is_placeholder.any() and (batch.attention_mask == 0).any()
    assert (labels[ignored] == IGNORE_INDEX).all()
    assert torch.equal(labels[~ignored], batch.input_ids[~ignored])


def test_sft_labels_need_offsets_and_spans(tokenizer):
    batch = tokenizer(["User: hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="offset_mapping"):
        build_labels(batch.input_ids, batch.attention_mask, [], mode="sft")


# --- shuffling ------------------------------------------------------------------------------

TURNS = [
    ("<image><image>What colour is the star?", "Red."),
    ("How many circles?", "2"),
    ("Is there a square?", "No."),
    ("What is the biggest shape?", "The star."),
    ("Now look at <image> this one: what is it?", "A cat."),
    ("Is it black?", "Yes."),
    ("Where is it?", "On the left."),
]


def test_shuffle_is_reproducible_and_keeps_images_first():
    orders = {tuple(shuffle_turns(TURNS, random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1
    assert shuffle_turns(TURNS, random.Random(3)) == shuffle_turns(TURNS, random.Random(3))
    for order in orders:
        first, second = order[:4], order[4:]
        # The leading images move to whichever question comes first in their segment.
        assert first[0][0].startswith("<image><image>")
        assert sum(user.count(IMAGE_TOKEN) for user, _ in first) == 2
        stripped = {(user.removeprefix("<image><image>"), answer) for user, answer in first}
        assert stripped == {(user.removeprefix("<image><image>"), answer) for user, answer in TURNS[:4]}
        # An image inside the question text pins that turn first in its segment.
        assert second[0] == TURNS[4]
        assert set(second) == set(TURNS[4:])
    assert any(order[0][1] != "Red." for order in orders)


def test_shuffle_keeps_image_only_questions_first():
    turns = [("<image>", "A caption."), ("What colour?", "Blue."), ("How many?", "3")]
    for seed in range(10):
        assert shuffle_turns(turns, random.Random(seed))[0] == turns[0]
