"""``python -m runners.export``: a Lightning checkpoint with LoRA/DoRA adapters (and frozen weights left out
of it, read again from their path) becomes a transformers Idefics2/Idefics3 folder that
``AutoModelForImageTextToText`` + ``AutoProcessor`` load offline and that generates the checkpoint's
tokens; a cross-attention model is saved in this project's format with equal logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from datamodules import VLMDataModule
from datamodules.synthetic import write_shards
from lit_modules import TrainingPolicy, VLMModule
from runners.export import export, load_checkpoint, main
from vlm.config import get_preset
from vlm.generation import stop_token_ids
from vlm.model import VisionLanguageModel
from vlm.processing import ImageProcessor, VLMProcessor, load_tiny_tokenizer
from vlm.processing.text import turns_to_messages

# (preset, recipe, tokens per tile, image settings, policy): 32 px tiles of 8 px patches.
CASES = {
    "idefics2": ("idefics2-tiny", "idefics2", 8, {"shortest_edge": 32, "longest_edge": 64}, "lora", "dora"),
    "idefics3": ("idefics3-tiny", "idefics3", 4, {"tile_size": 32, "longest_edge": 64}, "dora", "lora"),
}
QUESTION = "<image>How many shapes are there?"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards("cauldron", root / "cauldron", 4, seed=0)
    return root


def train_and_checkpoint(
    tmp_path: Path, shards: Path, case: str, fusion: str = "autoregressive", lm_path: str | None = None
) -> Path:
    """One training step of a tiny model with nudged LoRA/DoRA adapters, saved by a Lightning Trainer."""
    preset, recipe, image_seq_len, images, language_mode, vision_mode = CASES[case]
    config = get_preset(preset)
    config.language.pretrained = lm_path
    policy = TrainingPolicy(vision_tower=vision_mode, language_model=language_mode, lora_dropout=0.0)
    torch.manual_seed(0)
    module = VLMModule(config, fusion=fusion, policy=policy, lr=1e-3, max_steps=1)
    module.configure_model()
    with torch.no_grad():  # the adapters start as identities: make merging change the weights
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
            elif "lora_magnitude" in name:
                param.mul_(1.5)
    urls = f"{shards}/cauldron/*/*.parquet"
    source = {"source": "cauldron", "urls": urls, "weight": 1.0, "max_seq_len": 256}
    data = VLMDataModule(
        [source],
        recipe=recipe,
        image_seq_len=image_seq_len,
        image_processor=images,
        batch_size=1,
        max_seq_len=256,
        shuffle_block=2,
        pack_window=2,
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path


def image() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def our_tokens(module: VLMModule, processor: VLMProcessor, max_new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation of the question about ``image()`` by the checkpoint's own model."""
    messages = [turns_to_messages([(QUESTION, "")])[:1]]
    inputs = processor.encode_conversations(
        messages, [[image()]], add_generation_prompt=True, padding_side="left"
    )
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    stops = stop_token_ids(processor.tokenizer)  # as the exported generation config
    sequences = module.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stops)
    return sequences[0, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_to_transformers_generates_the_checkpoint_tokens(tmp_path, shards, case):
    lm_path = None
    if case == "idefics2":  # a frozen LoRA-adapted LM loaded from a path: left out of the checkpoint
        lm = VisionLanguageModel(get_preset("idefics2-tiny"), load_tiny_tokenizer()).language_model
        lm.save_pretrained(tmp_path / "lm")
        lm_path = str(tmp_path / "lm")
    ckpt = train_and_checkpoint(tmp_path, shards, case, lm_path=lm_path)
    checkpoint = torch.load(ckpt, weights_only=True)
    assert ("omitted_weights" in checkpoint) == (lm_path is not None)
    assert any("lora_" in key for key in checkpoint["state_dict"])

    out = tmp_path / "export"
    main(["--ckpt_path", str(ckpt), "--out", str(out)])
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }

    module, processor = load_checkpoint(ckpt)
    hf_model = AutoModelForImageTextToText.from_pretrained(out).eval()
    hf_processor = AutoProcessor.from_pretrained(out)
    assert type(hf_model).__name__ == f"{case.capitalize()}ForConditionalGeneration"
    assert ImageProcessor.from_transformers(hf_processor.image_processor) == dataclasses.replace(
        processor.image_processor, resample=int(processor.image_processor.resample)
    )
    prompt = hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION[7:]}]}],
        add_generation_prompt=True,
    )
    inputs = hf_processor(text=[prompt], images=[[image()]], return_tensors="pt")
    reference = our_tokens(module, processor)
    generated = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == reference.tolist()
    with torch.no_grad():  # the merged export computes what the adapted checkpoint computes
        ours = module.model(**inputs).logits
        theirs = hf_model(**inputs).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_cross_attention_export_reloads_with_equal_logits(tmp_path, shards, capsys):
    ckpt = train_and_checkpoint(tmp_path, shards, "idefics2", fusion="cross_attention")
    out = tmp_path / "export"
    assert export(ckpt, out) == "vlm"
    assert "fusion='cross_attention'" in capsys.readouterr().out  # why no transformers folder
    module, processor = load_checkpoint(ckpt)
    reloaded = VisionLanguageModel.from_pretrained(out)
    assert not any("lora_" in name for name in reloaded.state_dict())
    inputs = processor([f"User:{QUESTION}<end_of_utterance>\nAssistant:"], [[image()]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, module.model(**inputs).logits)


def test_export_of_a_checkpoint_without_data_settings_asks_for_the_config(tmp_path):
    module = VLMModule("idefics2-tiny")
    module.configure_model()
    trainer = Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="--config"):
        export(tmp_path / "bare.ckpt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        export(tmp_path / "missing.ckpt", tmp_path / "out")
