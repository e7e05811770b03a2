"""Data pipeline: encoding every source, packing a mixture, the DataModule, exact Lightning resume."""

import inspect
import os
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from datamodules import VLMDataModule
from datamodules.encoding import SampleEncoder, default_mode, join_content
from datamodules.mixture import MixtureConfig
from datamodules.packing import RowPacker
from datamodules.sample import Sample
from datamodules.sources import iter_samples
from datamodules.synthetic import WRITERS, write_shards
from vlm.config import IGNORE_INDEX, get_preset
from vlm.model import VisionLanguageModel
from vlm.processing import ImageProcessor, VLMProcessor, load_tiny_tokenizer
from vlm.processing.text import image_placeholder_token_ids

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "data" / "tiny.yaml"
IMAGE_SEQ_LEN = 8  # idefics2-tiny: perceiver latents per 32 px tile


@pytest.fixture(scope="module")
def processor() -> VLMProcessor:
    image_processor = ImageProcessor("idefics2", shortest_edge=32, longest_edge=64)
    return VLMProcessor(load_tiny_tokenizer(), image_processor, image_seq_len=IMAGE_SEQ_LEN)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic shards of every source under ``<root>/<source>/`` (the layout tiny.yaml reads)."""
    root = tmp_path_factory.mktemp("shards")
    for source in WRITERS:
        write_shards(source, root / source, 8, seed=0)
    return root


def samples_of(root: Path, source: str) -> list[Sample]:
    shards = sorted(str(p) for p in (root / source).rglob("*") if p.suffix in (".tar", ".parquet"))
    if source == "laion_coco":
        shards = [s for s in shards if s.endswith(".tar")]
    return list(iter_samples(source, shards))


def tiny_config(root: Path, monkeypatch: pytest.MonkeyPatch, **overrides) -> dict:
    """``configs/data/tiny.yaml``'s init_args with ``${DATA_ROOT}`` = ``root`` (for this test only)."""
    monkeypatch.setenv("DATA_ROOT", str(root))
    return {**yaml.safe_load(TINY_CONFIG.read_text())["init_args"], **overrides}


def test_join_content_follows_m4():
    image = Image.new("RGB", (8, 8))
    assert join_content(["a", image, "b", "c", image, image, "d"]) == "a<image>b c<image><image>d"


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_encoder_documents_of_every_source(shards, processor, source):
    encoder = SampleEncoder(processor, shuffle_turns=True)
    placeholders = set(image_placeholder_token_ids(processor.tokenizer))
    samples = samples_of(shards, source)
    assert samples
    for sample in samples:
        doc = encoder(sample)
        assert doc is not None and len(doc.input_ids) == len(doc.labels)
        assert len(doc.tiles_per_image) == len(sample.images)
        assert doc.input_ids.count(processor.image_token_id) == doc.n_tiles * IMAGE_SEQ_LEN
        assert (doc.pixel_values is None) == (doc.n_tiles == 0)
        if doc.pixel_values is not None:
            assert len(doc.pixel_values) == doc.n_tiles and max(doc.pixel_values.shape[-2:]) <= 64
        for token, label in zip(doc.input_ids, doc.labels):
            assert label in (token, IGNORE_INDEX)
            if token in placeholders:
                assert label == IGNORE_INDEX
        labelled = processor.decode([t for t in doc.labels if t != IGNORE_INDEX])
        if default_mode(source) == "pretraining":  # every text token has a loss, eos closes the document
            assert doc.labels[-1] == doc.input_ids[-1] == processor.tokenizer.eos_token_id
            assert all(
                lab != IGNORE_INDEX for tok, lab in zip(doc.input_ids, doc.labels) if tok not in placeholders
            )
        else:  # answers only, images before the first question
            text = processor.decode(doc.input_ids)
            assert all(answer.strip() in labelled for _, answer in sample.turns)
            assert not any(question.strip() in labelled for question, _ in sample.turns)
            if sample.images:
                assert text.index("<image>") < min(text.index(q) for q, _ in sample.turns)
    assert encoder.stats.read == len(samples) and not encoder.stats.skipped


def test_encoder_counts_bad_samples_and_applies_max_resolution(processor):
    encoder = SampleEncoder(processor)
    image = Image.new("RGB", (200, 100), "red")
    assert encoder(Sample("obelics", "a", ["see <image> here", image])) is None
    assert encoder(Sample("cauldron", "b", [image], turns=[("<image><image>Q?", "A")])) is None
    assert encoder(Sample("cauldron", "c", [image], turns=[])) is None
    assert dict(encoder.stats.skipped) == {"image_token_in_text": 1, "image_count_mismatch": 1, "no_turns": 1}
    full = encoder(Sample("laion_coco", "d", [image, "a red image"]))
    small = encoder(Sample("laion_coco", "d", [image, "a red image"], meta={"max_image_resolution": 32}))
    assert full.pixel_values.shape[-1] == 64 and small.pixel_values.shape[-1] == 32
    encoder.set_max_resolution(40)
    assert encoder(Sample("laion_coco", "d", [image, "a red image"])).pixel_values.shape[-1] == 40


def test_row_packer_respects_row_budgets_and_counts_drops(shards, processor):
    sources = [
        {"source": "obelics", "urls": f"{shards}/obelics/*.tar", "weight": 0.5, "max_seq_len": 200},
        {"source": "cauldron", "urls": f"{shards}/cauldron/*/*.parquet", "weight": 0.3, "max_seq_len": 200},
        # a window of 8 tokens cannot hold an image run (8 <image> + 2 fake tokens): dropped, counted
        {"source": "pdfa", "urls": f"{shards}/pdfa/*.tar", "weight": 0.2, "max_seq_len": 8},
    ]
    encoder = SampleEncoder(processor)
    packer = RowPacker(
        encoder,
        max_seq_len=200,
        image_token_id=processor.image_token_id,
        placeholder_ids=image_placeholder_token_ids(processor.tokenizer),
        max_tiles=2,
    )
    samples = MixtureConfig(sources, shuffle_block=4).samples()
    rows = packer.rows(islice(samples, 48))
    assert all(sum(map(len, row)) <= 200 and sum(d.n_tiles for d in row) <= 2 for row in rows)
    assert packer.stats.skipped["too_long_image_span"] > 0
    assert packer.stats.skipped["too_many_tiles"] > 0  # documents of more than 2 images
    assert encoder.stats.read > 0


def test_datamodule_batches_feed_the_model(shards, monkeypatch):
    val = [{"source": "cauldron", "urls": f"{shards}/cauldron/*/*.parquet", "weight": 1, "max_seq_len": 256}]
    dm = VLMDataModule(**tiny_config(shards, monkeypatch, batch_size=2, val_sources=val))
    torch.manual_seed(0)
    model = VisionLanguageModel(get_preset("idefics2-tiny"), tokenizer=dm.processor.tokenizer)
    for batch, _ in zip(dm.train_dataloader(), range(2)):
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 256
        assert (batch["tiles_per_sample"] <= 16).all()
        loss = model(**batch).loss
        assert torch.isfinite(loss)
    val_batches = list(dm.val_dataloader())  # finite: every validation sample once
    assert sum(int((b["document_ids"].amax(1)).sum()) for b in val_batches) == len(
        samples_of(shards, "cauldron")
    )
    stats = dm.record_stats()
    assert {"obelics", "laion_coco", "pdfa", "encoding", "packing"} <= stats.keys()
    dm.set_mixture_weights({"obelics": 1.0})
    assert dm.state_dict()["mixture_weights"] == [1.0, 0.0, 0.0]
    assert dm.train_dataloader().dataset.weights == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_configs_parse(path):
    config = yaml.safe_load(path.read_text())
    assert config["class_path"] == "datamodules.VLMDataModule"
    args = config["init_args"]
    inspect.signature(VLMDataModule).bind(**args)  # every key is a constructor argument
    mixture = MixtureConfig(args["sources"])
    assert sum(s.weight for s in mixture.sources) == pytest.approx(1.0, abs=1e-3)
    assert all(s.max_seq_len <= args["max_seq_len"] for s in mixture.sources)


RESUME_SCRIPT = """
import sys
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import VLMDataModule
from vlm.config import get_preset
from vlm.model import VisionLanguageModel

config_path, ckpt_dir, out, ckpt_path = sys.argv[1:5]


class Tiny(LightningModule):
    def __init__(self, tokenizer):
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionLanguageModel(get_preset("idefics2-tiny"), tokenizer=tokenizer)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Record(Callback):
    seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step + 1] = batch["input_ids"].clone()


dm = VLMDataModule(**yaml.safe_load(open(config_path)))
trainer = Trainer(
    max_steps=4,
    accelerator="cpu",
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[
        Record(),
        ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1),
    ],
)
trainer.fit(Tiny(dm.processor.tokenizer), datamodule=dm, ckpt_path=None if ckpt_path == "-" else ckpt_path)
torch.save(Record.seen, out)
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_continues_with_the_same_batches(shards, tmp_path, num_workers, monkeypatch):
    config = tiny_config(shards, monkeypatch, num_workers=num_workers, batch_size=1)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "run.py").write_text(textwrap.dedent(RESUME_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(ckpt_dir: str, out: str, ckpt_path: str) -> dict[int, torch.Tensor]:
        args = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "config.yaml")]
        command = [*args, str(tmp_path / ckpt_dir), str(tmp_path / out), ckpt_path]
        subprocess.run(command, env=env, check=True, timeout=600)
        return torch.load(tmp_path / out)

    full = run("full", "full.pt", "-")
    resumed = run("resumed", "resumed.pt", str(tmp_path / "full" / "step=2.ckpt"))
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert not (resumed[3].shape == full[1].shape and torch.equal(resumed[3], full[1]))  # not restarted
    for step in (3, 4):
        assert torch.equal(full[step], resumed[step])
