"""VLMProcessor equals transformers' Idefics2Processor / Idefics3Processor (PIL image processors).

Same tokenizer, same settings, same texts and images -> identical input_ids and attention_mask,
pixel_values within 1e-5 and identical pixel_attention_mask, over 30+ image sizes and modes, both
recipes, image splitting on and off.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from idefics_fixtures import RELEASED_IDEFICS2_CHAT_TEMPLATE
from PIL import Image
from transformers import Idefics2Processor, Idefics3Processor
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from vlm.config import get_preset
from vlm.model import VisionLanguageModel
from vlm.processing import ImageProcessor, VLMProcessor
from vlm.processing.tokenizer import load_tiny_tokenizer

SIZES = [  # (width, height)
    (1, 1000), (1000, 1), (17, 23), (364, 364), (365, 364), (980, 980), (4000, 3000), (3000, 4000),
    (1, 1), (2, 2), (378, 378), (500, 300), (300, 500), (386, 386), (728, 364), (1456, 1456),
    (2000, 500), (100, 3000), (377, 379), (981, 979), (640, 480), (33, 1500),
]  # fmt: skip
MODES = ["L", "LA", "RGBA", "P", "P-transparency", "CMYK", "I;16", "I", "1", "RGB-from-jpeg"]


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Deterministic noise + gradient image of the given size and PIL mode."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    rgb = Image.fromarray(pixels)
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "P-transparency":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-70000, 70000, (height, width), dtype=np.int32))
    if mode == "RGB-from-jpeg":
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=80)
        return Image.open(io.BytesIO(buffer.getvalue()))
    return rgb.convert(mode)


def cases() -> list[list[Image.Image]]:
    """Samples of 1-2 images: every size in RGB, then every mode at a middle size (32 images)."""
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    images += [make_image(300 + 7 * i, 200 + 11 * i, mode, seed=i) for i, mode in enumerate(MODES)]
    return [images[i : i + 2] if i % 3 == 0 else [images[i]] for i in range(len(images))]


def reference_processor(recipe: str, splitting: bool):
    tokenizer = load_tiny_tokenizer()
    if recipe == "idefics2":
        return Idefics2Processor(
            Idefics2ImageProcessorPil(do_image_splitting=splitting), tokenizer, image_seq_len=4
        )
    return Idefics3Processor(
        Idefics3ImageProcessorPil(do_image_splitting=splitting), tokenizer, image_seq_len=9
    )


def prompt(n_images: int) -> str:
    return "User:" + "<image>" * n_images + "What is in the picture?<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("splitting", [False, True])
@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_matches_transformers_processor(recipe, splitting):
    reference = reference_processor(recipe, splitting)
    ours = VLMProcessor.from_transformers(reference)
    samples = cases()
    assert sum(map(len, samples)) >= 30
    if recipe == "idefics2" and splitting:
        # transformers divides by zero on the 1-pixel-high crops of a 1000x1 image (checked below)
        samples = [s for s in samples if all(min(im.size) > 1 for im in s)]
    for batch in (samples[i : i + 4] for i in range(0, len(samples), 4)):
        texts = [prompt(len(sample)) for sample in batch]
        expected = reference(text=texts, images=batch, padding=True, return_tensors="pt")
        got = ours(text=texts, images=batch, image_layout="transformers")
        assert set(got) == set(expected), (set(got), set(expected))
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["attention_mask"], expected["attention_mask"])
        assert got["pixel_values"].shape == expected["pixel_values"].shape
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
        assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"])


def test_idefics2_splitting_of_a_one_pixel_high_image_works_where_transformers_fails():
    image = make_image(700, 1)
    reference = reference_processor("idefics2", splitting=True)
    with pytest.raises(ZeroDivisionError):
        reference(text=[prompt(1)], images=[[image]], return_tensors="pt")
    out = VLMProcessor.from_transformers(reference)(text=[prompt(1)], images=[[image]])
    assert out["tiles_per_sample"].tolist() == [5]
    assert torch.isfinite(out["pixel_values"]).all()


def tiny_processor(preset: str, fusion: str = "autoregressive") -> tuple[VLMProcessor, VisionLanguageModel]:
    """A tiny model and its processor: tiles of the preset's vision image size, one token count."""
    config = get_preset(preset)
    config.fusion = fusion
    tokenizer = load_tiny_tokenizer()
    model = VisionLanguageModel(config, tokenizer=tokenizer).eval()
    tile = config.vision.image_size
    recipe = preset.split("-")[0]
    if recipe == "idefics3":
        image_processor = ImageProcessor("idefics3", tile_size=tile, longest_edge=2 * tile)
    else:
        image_processor = ImageProcessor("idefics2", shortest_edge=tile, longest_edge=2 * tile)
    per_tile = model.encode_images(torch.zeros(1, 3, tile, tile)).shape[1]
    return VLMProcessor(tokenizer, image_processor, image_seq_len=per_tile, fusion=fusion), model


@pytest.mark.parametrize("fusion", ["autoregressive", "cross_attention"])
@pytest.mark.parametrize("preset", ["idefics2-tiny", "idefics3-tiny"])
def test_flat_batches_feed_the_model(preset, fusion):
    processor, model = tiny_processor(preset, fusion)
    images = [[make_image(90, 50, seed=1), make_image(40, 64, seed=2)], [], [make_image(64, 64, seed=3)]]
    texts = [prompt(2), "Just text, no image.", prompt(1)]
    batch = processor(text=texts, images=images, return_labels=True)
    assert batch["pixel_values"].shape[0] == int(batch["tiles_per_sample"].sum())
    assert (batch["pixel_values"].flatten(1).abs().sum(1) > 0).all()  # no padding images
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    generated = model.generate(**processor(text=texts, images=images, padding_side="left"), max_new_tokens=3)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_flat_and_transformers_layouts_give_the_same_logits():
    processor, model = tiny_processor("idefics3-tiny")
    images = [[make_image(90, 50, seed=1)], [make_image(40, 64, seed=2), make_image(64, 30, seed=4)]]
    texts = [prompt(1), prompt(2)]
    with torch.no_grad():
        flat = model(**processor(text=texts, images=images)).logits
        padded = model(**processor(text=texts, images=images, image_layout="transformers")).logits
    torch.testing.assert_close(flat, padded, atol=1e-5, rtol=0)


def test_conversations_get_sft_labels_on_answers_only():
    processor, _ = tiny_processor("idefics2-tiny")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many squares?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Three."}]},
        {"role": "user", "content": [{"type": "text", "text": "And their colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    batch = processor.encode_conversations([conversation], images=[[make_image(50, 40)]])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.decode(labelled) == " Three.<end_of_utterance> Red.<end_of_utterance>"


def test_image_count_mismatch_is_a_clear_error():
    processor, _ = tiny_processor("idefics2-tiny")
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=[prompt(2)], images=[make_image(30, 30)])
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=[prompt(1)], images=[[make_image(30, 30), make_image(20, 20)]])


def test_image_token_budget_lowers_resolution_per_sample():
    tokenizer = load_tiny_tokenizer()
    image_processor = ImageProcessor("idefics3", tile_size=32, longest_edge=128)
    budgeted = VLMProcessor(tokenizer, image_processor, image_seq_len=4, max_image_tokens_per_sample=40)
    unbounded = VLMProcessor(tokenizer, image_processor, image_seq_len=4)
    images = [[make_image(128, 128)], [make_image(40, 30)]]
    texts = [prompt(1), prompt(1)]
    # 4x4 tiles + global at 128 px; the 40x30 image is upscaled to 128x96: 4x3 tiles + global
    assert unbounded(text=texts, images=images)["tiles_per_sample"].tolist() == [17, 13]
    batch = budgeted(text=texts, images=images)
    assert batch["tiles_per_sample"].tolist() == [10, 10]  # both lowered to 96 px: 3x3 tiles + global
    image_tokens = (batch["input_ids"] == budgeted.image_token_id).sum(1)
    assert (image_tokens <= 40).all()
    with pytest.raises(ValueError, match="at least 4"):
        VLMProcessor(tokenizer, image_processor, image_seq_len=4, max_image_tokens_per_sample=3)


def test_encoded_images_decode_and_bad_bytes_are_clear_errors(tmp_path):
    processor, _ = tiny_processor("idefics2-tiny")
    buffer = io.BytesIO()
    make_image(40, 30).save(buffer, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buffer.getvalue())
    from_bytes = processor(text=[prompt(1)], images=[buffer.getvalue()])
    from_path = processor(text=[prompt(1)], images=[[str(path)]])
    assert torch.equal(from_bytes["pixel_values"], from_path["pixel_values"])
    with pytest.raises(ValueError, match="not a readable image"):
        processor(text=[prompt(1)], images=[b""])
    with pytest.raises(ValueError, match="not a readable image"):
        processor(text=[prompt(1)], images=[b"\x89PNG\r\n\x1a\n" + b"garbage" * 10])


def test_small_images_without_upscaling_still_give_full_tiles_to_the_model():
    tokenizer = load_tiny_tokenizer()
    config = get_preset("idefics3-tiny")
    model = VisionLanguageModel(config, tokenizer=tokenizer).eval()
    image_processor = ImageProcessor("idefics3", tile_size=32, longest_edge=64, upscale_small_images=False)
    processor = VLMProcessor(tokenizer, image_processor, image_seq_len=4)
    images = [[make_image(20, 13)], [make_image(50, 40)]]
    batch = processor(text=[prompt(1), prompt(1)], images=images)
    assert batch["pixel_values"].shape[-2:] == (32, 32)
    assert batch["pixel_attention_mask"][0, 13:].sum() == 0  # the small image's padding is masked
    assert torch.isfinite(model(**batch).logits).all()


# --- drop-in for transformers' processors ---------------------------------------------------------


def chat(image_a: Image.Image | None, image_b: Image.Image | None) -> list[dict]:
    """A two-turn conversation whose image items hold their images, as transformers users write them."""
    first = (
        [{"type": "text", "text": "What is this?"}]
        if image_a is None
        else [
            {"type": "image", "image": image_a},
            {"type": "text", "text": "What is this?"},
        ]
    )
    second = [{"type": "text", "text": "And now?"}]
    if image_b is not None:
        second.insert(0, {"type": "image", "image": image_b})
    return [
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]},
        {"role": "user", "content": second},
    ]


def assert_same_inputs(got, expected) -> None:
    """Equal ids and mask; our flat tiles are transformers' tiles without its all-zero padding images."""
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    real = expected["pixel_attention_mask"].flatten(0, 1).any(dim=(1, 2))
    expected_tiles = expected["pixel_values"].flatten(0, 1)[real]
    torch.testing.assert_close(got["pixel_values"], expected_tiles, atol=1e-5, rtol=0)
    assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"].flatten(0, 1)[real])


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_transformers_style_calls_give_what_transformers_gives(recipe):
    reference = reference_processor(recipe, splitting=True)
    # the released Idefics3 template writes Llama 3's BOS as text; the tiny tokenizer adds its own BOS
    reference.chat_template = RELEASED_IDEFICS2_CHAT_TEMPLATE
    ours = VLMProcessor.from_transformers(reference)
    a, b, c = make_image(90, 50, seed=1), make_image(40, 64, seed=2), make_image(500, 300, seed=3)
    conversations = [chat(a, b), chat(None, None), chat(None, c)]
    texts = ours.apply_chat_template(conversations, add_generation_prompt=True)
    assert texts == reference.apply_chat_template(conversations, add_generation_prompt=True)
    nested, flat = [[a, b], [], [c]], [a, b, c]
    longest = int(ours(text=texts, images=nested)["attention_mask"].sum(1).max())
    for kwargs in (
        {"return_tensors": "pt", "padding": True},
        {"return_tensors": "pt", "padding": "max_length", "truncation": True, "max_length": longest + 7},
    ):
        expected = reference(text=texts, images=nested, **kwargs)
        for images in (nested, flat):
            assert_same_inputs(ours(text=texts, images=images, **kwargs), expected)
        padded = ours(text=texts, images=nested, image_layout="transformers", **kwargs)
        assert set(padded) == set(expected) and padded["pixel_values"].shape == expected["pixel_values"].shape
    tokenized = dict(
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert_same_inputs(
        ours.apply_chat_template(conversations, **tokenized),
        reference.apply_chat_template(conversations, **tokenized),
    )
    ids = ours.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=True)
    assert ids.shape[0] == 1 and ours.batch_decode(ids)[0] == ours.decode(ids[0])


def test_transformers_style_mistakes_are_named():
    processor, _ = tiny_processor("idefics3-tiny")
    image = make_image(64, 64)
    with pytest.raises(TypeError, match=r"do_image_splitting.*ImageProcessor"):
        processor(text=[prompt(1)], images=[image], do_image_splitting=False)
    with pytest.raises(ValueError, match=r"return_tensors='np'.*'pt'"):
        processor(text=[prompt(1)], images=[image], return_tensors="np")
    with pytest.raises(ValueError, match="max_length=20 cuts the image tokens of text 0"):
        processor(text=[prompt(1)], images=[image], truncation=True, max_length=20)
    with pytest.raises(ValueError, match="Message 0 has an image item without its image"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)
    with pytest.raises(TypeError, match="continue_final_message"):
        processor.apply_chat_template(chat(image, None), continue_final_message=True)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    tokenizer = load_tiny_tokenizer()
    image_processor = ImageProcessor("idefics3", tile_size=32, longest_edge=128, random_upscale=(0.5, 1.0))
    processor = VLMProcessor(
        tokenizer, image_processor, image_seq_len=4, fusion="cross_attention", max_image_tokens_per_sample=40
    )
    processor.save_pretrained(tmp_path / "saved")
    loaded = VLMProcessor.from_pretrained(tmp_path / "saved")
    assert loaded.image_processor == processor.image_processor
    assert (loaded.image_seq_len, loaded.fusion, loaded.pil_rgb_inputs) == (4, "cross_attention", False)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    images, texts = [[make_image(128, 128)], []], [prompt(1), "User: no image"]
    got, expected = loaded(text=texts, images=images), processor(text=texts, images=images)
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_from_pretrained_reads_a_folder_transformers_saved(recipe, tmp_path):
    reference = reference_processor(recipe, splitting=True)
    reference.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    expected = VLMProcessor.from_transformers(reference)
    assert loaded.image_processor == expected.image_processor
    assert loaded.image_seq_len == expected.image_seq_len
    assert loaded.pil_rgb_inputs == expected.pil_rgb_inputs == (recipe == "idefics2")
    images = [[make_image(300, 200)]]
    assert torch.equal(
        loaded(text=[prompt(1)], images=images)["input_ids"],
        expected(text=[prompt(1)], images=images)["input_ids"],
    )
