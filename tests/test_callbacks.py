"""Callbacks: NEFTune (noise only in training, transformers' formula), ResolutionRampUp, Telemetry."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from transformers.integrations.neftune import neftune_post_forward_hook

from callbacks import NEFTune, ResolutionRampUp, Telemetry
from callbacks.neftune import neftune_noise
from datamodules import VLMDataModule
from datamodules.synthetic import write_shards
from vlm.config import get_preset
from vlm.model import VisionLanguageModel
from vlm.processing import load_tiny_tokenizer

TILE = 64  # longest edge of the DataModule's images before any ramp-up


class TinyModule(LightningModule):
    """The ``VLMModule`` convention (model at ``self.model``) on idefics2-tiny; records what it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionLanguageModel(get_preset("idefics2-tiny"), tokenizer=load_tiny_tokenizer())
        self.longest_edges: dict[int, int] = {}  # global step -> longest pixel_values edge of its batch
        self.embedding_noise: list[tuple[float, float]] = []  # (max |noise|, alpha / sqrt(L d)) per step

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.longest_edges[self.global_step] = max(batch["pixel_values"].shape[-2:])
        embedding = self.model.language_model.get_input_embeddings()
        noise = embedding(batch["input_ids"]) - embedding.weight[batch["input_ids"]]
        self.embedding_noise.append((noise.abs().max().item(), 5.0 / noise[0].numel() ** 0.5))
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("laion_coco")
    write_shards("laion_coco", root, 16, seed=0)
    return root


def datamodule(shards: Path, num_workers: int = 0) -> VLMDataModule:
    source = {"source": "laion_coco", "urls": f"{shards}/*.tar", "weight": 1.0, "max_seq_len": 128}
    return VLMDataModule(
        [source],
        image_seq_len=8,  # idefics2-tiny: perceiver latents per image
        image_processor={"shortest_edge": 16, "longest_edge": TILE},
        max_seq_len=128,
        shuffle_block=4,
        pack_window=4,
        num_workers=num_workers,
    )


def fit(
    shards: Path, callbacks: list, max_steps: int, num_workers: int = 0, ckpt_path: Path | None = None
) -> tuple[Trainer, TinyModule]:
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    module = TinyModule()
    trainer.fit(module, datamodule=datamodule(shards, num_workers), ckpt_path=ckpt_path)
    return trainer, module


def test_neftune_matches_transformers_formula():
    embedding = torch.nn.Embedding(100, 48)
    embedding.neftune_noise_alpha = 5.0
    ids = torch.randint(0, 100, (3, 20))
    clean = embedding(ids).detach()
    torch.manual_seed(1)
    expected = neftune_post_forward_hook(embedding, (ids,), clean)
    torch.manual_seed(1)
    noisy = neftune_noise(clean, 5.0)
    assert torch.equal(noisy, expected)
    noise, bound = noisy - clean, 5.0 / (20 * 48) ** 0.5  # U(-b, b): mean 0, std b / sqrt(3)
    assert noise.abs().max() <= bound * (1 + 1e-6) and noise.abs().max() > 0.95 * bound
    assert abs(noise.mean()) < 0.05 * bound and noise.std() == pytest.approx(bound / 3**0.5, rel=0.05)


def test_neftune_only_in_training_with_gradients():
    module = TinyModule().eval()
    ids = load_tiny_tokenizer()(["two red squares", "a blue circle, big"], return_tensors="pt", padding=True)
    ids = ids["input_ids"]
    clean = module.model(input_ids=ids).logits
    trainer, callback = Trainer(logger=False, accelerator="cpu"), NEFTune(noise_alpha=5.0)
    callback.on_fit_start(trainer, module)
    embedding = module.model.language_model.get_input_embeddings()

    trainer.training = True
    module.train()
    noise = embedding(ids) - embedding.weight[ids]
    assert 0 < noise.abs().max() <= 5.0 / (ids.shape[1] * embedding.embedding_dim) ** 0.5
    assert not torch.allclose(module.model(input_ids=ids).logits, clean)
    with torch.no_grad():  # generation-style call inside training: no noise
        assert torch.equal(embedding(ids), embedding.weight[ids])

    trainer.validating = True
    module.eval()
    assert torch.equal(module.model(input_ids=ids).logits, clean)
    callback.on_fit_end(trainer, module)
    assert not embedding._forward_hooks


def test_callbacks_in_a_fit(shards):
    """ResolutionRampUp switches the processed image size at the scheduled steps; NEFTune noises the
    training embeddings and is removed after fit; Telemetry logs its keys."""
    ramp = ResolutionRampUp([(0, 32), (2, 48), (3, TILE)])
    telemetry = Telemetry(log_every_n_steps=2, peak_flops=1e12)
    trainer, module = fit(shards, [NEFTune(), ramp, telemetry], max_steps=5)
    assert module.longest_edges == {0: 32, 1: 32, 2: 48, 3: TILE, 4: TILE}
    assert ramp.state_dict() == {"resolution": TILE} and trainer.datamodule.max_resolution == TILE
    assert all(0 < noise <= bound * (1 + 1e-6) for noise, bound in module.embedding_noise)
    assert not module.model.language_model.get_input_embeddings()._forward_hooks
    metrics = trainer.callback_metrics
    expected = {"perf/tokens_per_s", "perf/images_per_s", "perf/tiles_per_s", "perf/mfu"}
    expected |= {"batch/padding_pct", "batch/image_token_pct", "batch/images_per_row"}
    assert expected <= set(metrics)
    assert all(metrics[k] > 0 for k in expected - {"batch/padding_pct"})
    assert 0 <= metrics["batch/padding_pct"] < 100 and metrics["batch/image_token_pct"] < 100


def test_resolution_ramp_up_with_workers_and_resume(shards, tmp_path):
    """With dataloader workers the change still lands at the scheduled step; a resumed run re-applies
    the checkpointed resolution before its first batch."""
    trainer, module = fit(shards, [ResolutionRampUp({2: 32})], max_steps=3, num_workers=2)
    assert module.longest_edges == {0: TILE, 1: TILE, 2: 32}
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    ramp = ResolutionRampUp({2: 32})
    _, resumed = fit(shards, [ramp], max_steps=5, num_workers=2, ckpt_path=checkpoint)
    assert resumed.longest_edges == {3: 32, 4: 32} and ramp.resolution == 32
