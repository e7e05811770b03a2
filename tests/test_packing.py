"""Packing: windows never cut image runs, best-fit rows, labels/positions/documents, and the packed model."""

import random

import pytest
import torch
from PIL import Image
from test_processor import tiny_processor

from datamodules.packing import (
    TokenizedDocument,
    collate_rows,
    image_spans,
    pack,
    packing_efficiency,
    split_document,
)
from vlm.config import IGNORE_INDEX
from vlm.processing.text import image_placeholder_token_ids


def encode(processor, text: str, images: list[Image.Image]) -> TokenizedDocument:
    """A processed sample as a ``TokenizedDocument`` (pretraining labels, flat tiles)."""
    out = processor(text, [images] if images else None, return_labels=True, padding=False)
    return TokenizedDocument(
        out["input_ids"][0].tolist(),
        out["labels"][0].tolist(),
        out.get("pixel_values"),
        out.get("pixel_attention_mask"),
        out["tiles_per_image"].tolist() if images else [],
    )


def image(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = random.Random(seed)
    return Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))


@pytest.fixture(scope="module", params=["idefics2-tiny", "idefics3-tiny"])
def processor_and_model(request):
    torch.manual_seed(0)
    return tiny_processor(request.param)


def test_windows_never_cut_image_runs(processor_and_model):
    processor, _ = processor_and_model
    placeholders = image_placeholder_token_ids(processor.tokenizer)
    text = "a cat sits on the mat " * 3 + "<image><image>" + " and a dog runs far away" * 4 + "<image> end"
    doc = encode(processor, text, [image(0), image(1, (64, 32)), image(2)])
    spans = image_spans(doc, processor.image_token_id, placeholders)
    assert len(spans) == 3 and all(doc.input_ids[s] not in (processor.image_token_id,) for s, _ in spans)
    merged: list[list[int]] = []  # adjacent images share a <fake_token_around_image>: one run
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    longest = max(end - start for start, end in merged)
    windows = split_document(doc, longest + 5, processor.image_token_id, placeholders)
    assert windows is not None and len(windows) > 1
    assert sum(len(w) for w in windows) == len(doc)
    assert [t for w in windows for t in w.input_ids] == doc.input_ids
    assert sum(w.n_tiles for w in windows) == doc.n_tiles
    for window in windows:  # every window's image tokens match its tiles: a whole number of images
        n_image_tokens = window.input_ids.count(processor.image_token_id)
        assert n_image_tokens == window.n_tiles * processor.image_seq_len
        if window.pixel_values is not None:
            assert len(window.pixel_values) == window.n_tiles
    assert split_document(doc, longest - 1, processor.image_token_id, placeholders) is None


def test_best_fit_decreasing_beats_first_fit_order():
    docs = [TokenizedDocument([1] * n, [1] * n) for n in (5, 6, 4, 3, 2, 4)]  # 24 tokens: 3 rows of 8
    rows = pack(docs, max_seq_len=8)
    assert sorted(sum(map(len, row)) for row in rows) == [8, 8, 8]
    with_tiles = [TokenizedDocument([1] * 2, [1] * 2, tiles_per_image=[2]) for _ in range(4)]
    assert [len(row) for row in pack(with_tiles, max_seq_len=100, max_tiles=4)] == [2, 2]


def test_collate_positions_documents_and_labels():
    rows = [
        [TokenizedDocument([1, 2, 3], [1, 2, 3]), TokenizedDocument([4, 5], [4, IGNORE_INDEX])],
        [TokenizedDocument([6], [6])],
    ]
    batch = collate_rows(rows, pad_token_id=0, seq_len=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 0, 0, 0, 0, 0]]
    # padding-free: the padding at the end of a row is one more sequence, positions restarting at 0
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert batch["document_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 0, 0, 0, 0, 0]]
    # the first token of each document is never predicted from the previous document
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100, -100], [-100] + [-100] * 5]
    assert packing_efficiency(batch) == pytest.approx(6 / 12)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):  # boundaries over the batch flattened to one row
        assert batch[key].dtype == torch.int32 and batch[key].tolist() == [0, 3, 5, 6, 7, 12]
    assert batch["max_length_q"] == batch["max_length_k"] == 5 and "attention_mask" not in batch
    dense = collate_rows(rows, pad_token_id=0, seq_len=6, padding_free=False)
    assert dense["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert dense["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert not any(key.startswith(("cu_seq_lens", "max_length")) for key in dense)
    full = collate_rows(
        [[TokenizedDocument([1, 2], [1, 2])]], pad_token_id=0
    )  # no padding: no extra sequence
    assert full["cu_seq_lens_q"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="seq_len=1"):
        collate_rows(rows, pad_token_id=0, seq_len=1)


def test_packing_efficiency_on_obelics_like_lengths():
    """Lognormal document lengths (median ~400 tokens, long tail) with 0-4 images of 64 tokens."""
    rng = random.Random(0)
    docs = []
    for _ in range(3000):
        n_images = rng.randint(0, 4)
        n_text = int(min(rng.lognormvariate(6.0, 0.8), 4000))
        ids = [1] * n_text + [2] * (64 * n_images)
        docs.append(TokenizedDocument(ids, ids, tiles_per_image=[1] * n_images))
    windows = [w for doc in docs for w in split_document(doc, 2048, 2, [2])]
    rows = pack(windows, max_seq_len=2048, max_tiles=64)
    batch = collate_rows(rows, pad_token_id=0, seq_len=2048)
    assert packing_efficiency(batch) >= 0.97


def test_packed_logits_and_loss_equal_documents_alone(processor_and_model):
    processor, model = processor_and_model
    texts = [
        "<image>a red square on a table",
        "hello world, no image here at all",
        "two<image><image>pictures",
    ]
    images = [[image(3)], [], [image(4, (64, 32)), image(5)]]
    docs = [encode(processor, text, imgs) for text, imgs in zip(texts, images)]
    batch = collate_rows([docs], pad_token_id=0, seq_len=sum(map(len, docs)) + 3)
    with torch.no_grad():
        packed = model(**batch)
        alone = []
        for doc in docs:
            single = collate_rows([[doc]], pad_token_id=0)
            alone.append(model(**single))
    start, weighted, n_tokens = 0, 0.0, 0
    for doc, out in zip(docs, alone):
        end = start + len(doc)
        torch.testing.assert_close(packed.logits[0, start:end], out.logits[0], atol=1e-5, rtol=1e-5)
        n = int((torch.tensor(doc.labels[1:]) != IGNORE_INDEX).sum())
        weighted, n_tokens, start = weighted + float(out.loss) * n, n_tokens + n, end
    assert float(packed.loss) == pytest.approx(weighted / n_tokens, rel=1e-5)
