"""``VLMDataModule``: a YAML-configurable LightningDataModule, shards -> mixture -> encode -> pack -> batches.

Training data is an endless weighted mixture in canonical partitions (``datamodules.order``; train
length is set in steps), encoded by ``SampleEncoder`` and packed window by window into rows of
``max_seq_len`` tokens and at most ``max_tiles_per_row`` tiles (``RowPacker``), served by a
``ResumableLoader`` whose state Lightning stores in every checkpoint: ``fit(ckpt_path=...)`` seeks
to exactly where the interrupted run was and continues with the same global batches, also on
another number of devices or workers (``datamodules.streaming``). ``prepare_data`` indexes the
shards (``datamodules.index``). The DataModule's own ``state_dict`` keeps what callbacks changed
(mixture weights, maximum resolution, row length), restored before the loader is built.
Validation data (``val_sources``) is read once, in order, per validation run: packed like
training (``val/loss``) or, with ``val_generate``, as
one prompt per question of each conversation (``val/acc``, see ``datamodules.held_out``).
``synthetic`` / ``val_synthetic`` write miniature shards (``datamodules.synthetic.write_shards``)
under ``data_root`` in ``prepare_data`` when they are absent (the CPU demo).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.contract import ModelProcessing
from datamodules.encoding import SampleEncoder
from datamodules.held_out import QuestionDataset
from datamodules.index import index_shards
from datamodules.mixture import MixtureConfig, SourceConfig
from datamodules.packing import RowPacker, collate_rows
from datamodules.sample import Sample
from datamodules.sources import expand_urls
from datamodules.sources.base import RecordStats, get_reader, read_shard, shard_names
from datamodules.sources.shard_io import ShardIO
from datamodules.streaming import PartitionedStream, ResumableLoader, StreamLayout
from datamodules.synthetic import write_shards
from vlm.config import Fusion, Recipe
from vlm.evaluation.batch import collate_prompts
from vlm.processing.text import LabelMode, image_placeholder_token_ids

#: Seed offset of ``val_synthetic`` shards: validation records come from another random stream than
#: the training ones (``synthetic``, written with ``seed``), so they are held out.
VAL_SEED_OFFSET = 1_000_003


def expand_env(source: dict[str, Any]) -> dict[str, Any]:
    """The source with environment variables (``${DATA_ROOT}``) expanded in its ``urls``: jsonargparse
    and LightningCLI leave them as written."""
    urls = source["urls"]
    expanded = os.path.expandvars(urls) if isinstance(urls, str) else [os.path.expandvars(u) for u in urls]
    return {**source, "urls": expanded}


def consumer_slot() -> tuple[int, int]:
    """``(consumer, consumers)`` of the calling process: ranks x dataloader workers."""
    initialised = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * workers + worker, world_size * workers


class SequentialStream(IterableDataset):
    """Every sample of the given sources once, source after source, in shard order (validation), with
    their ``max_seq_len`` / ``max_image_resolution`` in ``meta``. With ``split`` (validation loss),
    ranks and workers read disjoint shards (disjoint samples when there are fewer shards than readers);
    without, every reader gets every sample (the held-out questions: a map-style dataset that Lightning's
    distributed sampler splits, so splitting here too would leave each rank 1/world^2 of them).
    """

    def __init__(self, sources: Sequence[SourceConfig], split: bool = True) -> None:
        self.sources, self.split = list(sources), split
        self.stats = {s.source: RecordStats() for s in self.sources}

    def __iter__(self) -> Iterator[Sample]:
        consumer, consumers = consumer_slot() if self.split else (0, 1)
        for config in self.sources:
            reader, shards = get_reader(config.source), expand_urls(config.urls)
            named = list(zip(shards, shard_names(shards)))
            mine = named[consumer::consumers] if len(shards) >= consumers else named
            stats = self.stats[config.source]
            samples = (
                sample
                for shard, name in mine
                for sample in read_shard(reader, shard, name, stats, **config.options)
            )
            if len(shards) < consumers:
                samples = islice(samples, consumer, None, consumers)
            limits = {"max_seq_len": config.max_seq_len, "max_image_resolution": config.max_image_resolution}
            for sample in samples:
                yield dataclasses.replace(sample, meta={**sample.meta, **limits})


class PackedSequence(IterableDataset):
    """Packed rows of a ``SequentialStream``, ``window`` samples at a time (validation loss)."""

    def __init__(self, samples: SequentialStream, packer: RowPacker, window: int) -> None:
        self.samples, self.packer, self.window = samples, packer, window

    def __iter__(self) -> Iterator[list]:
        samples = iter(self.samples)
        while window := list(islice(samples, self.window)):
            yield from self.packer.rows(window)


class VLMDataModule(ModelProcessing, LightningDataModule):
    """Packed, resumable VLM batches from a mixture of sources (``SourceConfig`` dicts, as in YAML).

    - ``sources``: ``{source, urls, weight, max_seq_len, max_image_resolution, options}`` items;
      ``${VAR}`` in ``urls`` is expanded from the environment.
    - ``tokenizer``, ``recipe``, ``image_seq_len``, ``fusion`` and ``image_processor``
      (``ImageProcessor`` keyword arguments: ``longest_edge``, ``shortest_edge``, ``tile_size``,
      ``do_image_splitting``, ``split_fraction``, ``random_upscale``...) define the ``VLMProcessor``.
      The first four are the model's (``vlm.processing.contract``): ``connect(model)`` (called by
      ``setup`` with the trainer's LightningModule) takes them; leave them ``None``. One that is set
      must equal the model's, or ``connect`` stops naming both keys. With no model connected, unset
      ones are ``VLMModule()``'s (``default_settings``).
    - ``mode``: ``"pretraining"`` or ``"sft"`` for every source, a ``{source: mode}`` dict, or
      ``None`` (conversation sources ``sft``, the others ``pretraining``).
    - ``max_tiles_per_row`` also caps each sample's tiles (its resolution is lowered to fit).
    - Streaming (``datamodules.streaming``): ``shuffle_block`` records are read together and shuffled
      (blocks are shuffled too); ``pack_window`` samples are packed together (a resume re-reads at
      most one window per partition); ``partitions`` canonical partitions of the sample order (default:
      devices x ``num_workers`` at the first start, then whatever the checkpoint holds; they must
      divide the global batch, a multiple of the device count). ``shard_io``: ``ShardIO`` options for
      remote training shards (retries, backoff, a local shard cache with a size cap); validation
      shards are read whole with the default ones.
    - ``val_generate``: validation batches are ``PromptBatch``es (``val/acc``, exact match; see
      ``vlm.evaluation.scoring``) built from the conversations of ``val_sources``, one per question (at most
      ``val_max_questions_per_sample`` per sample), instead of packed rows (``val/loss``).
    - ``predict_sources`` (default: ``val_sources``): the questions ``python -m lightning predict``
      answers, one per question of each conversation as ``val_generate`` (``question_items``), in
      batches of ``val_batch_size``; any source, e.g. ``{source: questions, urls: q.jsonl}`` for a
      JSON-lines file of ``{id, images, question, answer?}`` (``datamodules.sources.questions``).
      ``weight`` and ``max_seq_len`` may be left out of these.
    - ``synthetic`` / ``val_synthetic``: ``{source: n_samples}`` miniature shards written by
      ``prepare_data`` under ``data_root/<source>`` / ``data_root/val/<source>`` when that folder
      is absent or empty; the validation shards use another seed (``seed + VAL_SEED_OFFSET``).
      ``sources`` / ``val_sources`` ``urls`` must point at them. ``synthetic_options``:
      ``{source: {option: value}}`` writer options for both (``{"cauldron": {"layout": "random"}}``:
      distinct images, so the validation images are held out too, not only the records).
    """

    def __init__(
        self,
        sources: list[dict[str, Any]],
        tokenizer: str | None = None,
        recipe: Recipe | None = None,
        image_seq_len: int | None = None,
        fusion: Fusion | None = None,
        image_processor: dict[str, Any] | None = None,
        mode: LabelMode | dict[str, LabelMode] | None = None,
        shuffle_turns: bool = False,
        batch_size: int = 1,
        max_seq_len: int = 2048,
        max_tiles_per_row: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_block: int = 64,
        max_bad_record_rate: float | None = 0.05,
        pack_window: int = 256,
        partitions: int | None = None,
        persistent_workers: bool = False,
        shard_io: dict[str, Any] | None = None,
        val_sources: list[dict[str, Any]] | None = None,
        val_batch_size: int | None = None,
        val_generate: bool = False,
        val_max_questions_per_sample: int | None = None,
        predict_sources: list[dict[str, Any]] | None = None,
        data_root: str | None = None,
        synthetic: dict[str, int] | None = None,
        val_synthetic: dict[str, int] | None = None,
        synthetic_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        # In checkpoints, so that a model can be exported or served with the processor it was trained
        # with (runners.export); not logged (the model's hyper-parameters are).
        self.save_hyperparameters(logger=False)
        if (synthetic or val_synthetic) and data_root is None:
            raise ValueError("synthetic / val_synthetic need data_root (where the shards are written).")
        self.data_root = None if data_root is None else os.path.expandvars(data_root)
        self.synthetic, self.val_synthetic = dict(synthetic or {}), dict(val_synthetic or {})
        self.synthetic_options = {source: dict(opts) for source, opts in (synthetic_options or {}).items()}
        if set(self.synthetic_options) - set(self.synthetic) - set(self.val_synthetic):
            raise ValueError(f"synthetic_options {self.synthetic_options} name sources not written.")
        self.val_generate, self.val_max_questions_per_sample = val_generate, val_max_questions_per_sample
        self.io = ShardIO(**(shard_io or {}))
        self.mixture = MixtureConfig(
            [expand_env(s) for s in sources], seed, shuffle_block, max_bad_record_rate, self.io
        )
        self.val_sources = [SourceConfig(**expand_env(s)) for s in val_sources or []]
        self.predict_sources = [
            SourceConfig(**{"weight": 1.0, "max_seq_len": max_seq_len, **expand_env(s)})
            for s in predict_sources or []
        ]
        self.processor_settings_given(tokenizer, recipe, image_seq_len, fusion, image_processor)
        self.mode, self.shuffle_turns = mode, shuffle_turns
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_seq_len, self.max_tiles_per_row = max_seq_len, max_tiles_per_row
        self.num_workers, self.seed, self.persistent_workers = num_workers, seed, persistent_workers
        self.pack_window, self.partitions = pack_window, partitions
        self.mixture_weights: list[float] | None = None  # set by set_mixture_weights (stage transitions)
        self.max_resolution: int | None = None  # set by set_max_resolution (resolution ramp-up)
        self._train_loader: ResumableLoader | None = None

    def image_options(self) -> dict[str, Any]:
        """``image_processor``, its tiles per sample capped by ``max_tiles_per_row``."""
        return {"max_tiles_per_sample": self.max_tiles_per_row, **self.image_processor_options}

    def prepare_data(self) -> None:
        """Write the ``synthetic`` / ``val_synthetic`` shards that are absent, then index the training
        shards (once per node: the other ranks read the cached indexes). Training shards only for a
        fit (or without a trainer): ``validate`` / ``predict`` do not read them."""
        training = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        self._write_synthetic(training)
        if training:
            self._index_shards()

    def _write_synthetic(self, training: bool) -> None:
        if self.data_root is None:
            return
        root = Path(self.data_root)
        for folder, counts, seed in (
            (root, self.synthetic if training else {}, self.seed),
            (root / "val", self.val_synthetic, self.seed + VAL_SEED_OFFSET),
        ):
            for source, n_samples in counts.items():
                out_dir = folder / source
                if out_dir.is_dir() and any(out_dir.iterdir()):
                    continue
                tmp_dir = folder / f".{source}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
                write_shards(source, tmp_dir, n_samples, seed=seed, **self.synthetic_options.get(source, {}))
                os.replace(tmp_dir, out_dir)  # atomic: an interrupted write leaves no half-written folder
                print(f"Wrote {n_samples} synthetic {source} samples to {out_dir}")

    def _index_shards(self) -> None:
        for source in self.mixture.sources:
            index_shards(source.urls, source.options.get("format"), self.io, progress=True)

    def _layout(self) -> StreamLayout:
        trainer = self.trainer
        world_size, rank, accumulation = (
            (1, 0, 1)
            if trainer is None
            else (trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches)
        )
        global_batch = self.batch_size * world_size * accumulation
        partitions = self.partitions
        if partitions is None:  # as many as readers, among the multiples of world_size dividing the batch
            wanted = world_size * max(self.num_workers, 1)
            partitions = max(p for p in range(world_size, wanted + 1, world_size) if global_batch % p == 0)
        return StreamLayout(partitions, world_size, rank, self.num_workers, self.batch_size, accumulation)

    def _settings(self) -> dict[str, Any]:
        return {
            "weights": self.mixture_weights or self.mixture.weights,
            "max_resolution": self.max_resolution,
            "max_seq_len": self.max_seq_len,
        }

    def train_dataloader(self) -> ResumableLoader:
        layout = self._layout()
        settings = self._settings()
        dataset = PartitionedStream(
            self.mixture.streams(layout.partitions),
            settings["weights"],
            self._packer(training=True),
            window=self.pack_window,
            seed=self.seed,
        )
        self._train_loader = ResumableLoader(
            dataset,
            layout,
            partial(collate_rows, pad_token_id=self.processor.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            settings=settings,
            dataloader_options={"persistent_workers": self.persistent_workers},
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batch Lightning is about to use as consumed (its ``data_position``)."""
        if self._train_loader is not None and isinstance(batch, dict):
            self._train_loader.consumed(batch)
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        if self.val_generate:
            return self._questions_loader(self.val_sources)
        return DataLoader(
            PackedSequence(
                SequentialStream(self.val_sources), self._packer(training=False), self.pack_window
            ),
            batch_size=self.val_batch_size,
            collate_fn=partial(collate_rows, pad_token_id=self.processor.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def predict_dataloader(self) -> DataLoader:
        """The questions of ``predict_sources`` (or else ``val_sources``) as generation batches."""
        sources = self.predict_sources or self.val_sources
        if not sources:
            raise ValueError(
                "Nothing to predict: set data.predict_sources (e.g. [{source: questions, urls: "
                "questions.jsonl}]) or data.val_sources."
            )
        return self._questions_loader(sources)

    def _questions_loader(self, sources: Sequence[SourceConfig]) -> DataLoader:
        """Every question of ``sources`` on every rank; under DDP/FSDP Lightning's distributed sampler
        gives each rank its share (padded with a few repeats to equal lengths, which the
        ``PredictionWriter`` drops)."""
        return DataLoader(
            QuestionDataset(SequentialStream(sources, split=False), self.val_max_questions_per_sample),
            batch_size=self.val_batch_size,
            collate_fn=partial(collate_prompts, processor=self.processor),
            num_workers=0,  # the questions are read once, in the main process
        )

    def _packer(self, training: bool) -> RowPacker:
        encoder = SampleEncoder(
            self.processor,
            modes=self._modes(),
            training=training,
            shuffle_turns=self.shuffle_turns,
            seed=self.seed,
        )
        if self.max_resolution is not None:
            encoder.set_max_resolution(self.max_resolution)
        return RowPacker(
            encoder,
            self.max_seq_len,
            self.processor.image_token_id,
            image_placeholder_token_ids(self.processor.tokenizer),
            max_tiles=self.max_tiles_per_row,
        )

    def _modes(self) -> dict[str, LabelMode]:
        if isinstance(self.mode, dict):
            return dict(self.mode)
        sources = {s.source for s in [*self.mixture.sources, *self.val_sources]}
        return {} if self.mode is None else dict.fromkeys(sources, self.mode)

    # --- hooks for callbacks (stage transitions, resolution ramp-up); kept in ``state_dict`` -----

    def set_mixture_weights(self, weights: Sequence[float] | dict[str, float]) -> None:
        """New source weights (a list in ``sources`` order, or ``{source: weight}``).

        A new segment of the stream starts (each partition continues after its current window, see
        ``datamodules.streaming``) when the train loader is iterated again (the calling callback
        must make the trainer re-iterate it).
        """
        if isinstance(weights, dict):
            known = [s.source for s in self.mixture.sources]
            unknown = set(weights) - set(known)
            if unknown:
                raise ValueError(f"Mixture weights name {sorted(unknown)}, not among the sources {known}.")
            weights = [weights.get(source, 0.0) for source in known]
        self.mixture_weights = list(weights)
        self._update_train_stream()

    def _update_train_stream(self) -> None:
        """Give the train loader the current settings (they reach the batches at its next iteration)."""
        if self._train_loader is None:
            return
        dataset, settings = self._train_loader.dataset, self._settings()
        dataset.weights = settings["weights"]
        dataset.packer.max_seq_len = self.max_seq_len
        if self.max_resolution is not None:
            dataset.packer.encode.set_max_resolution(self.max_resolution)
        self._train_loader.update_settings(**settings)

    def set_max_resolution(self, longest_edge: int) -> None:
        """New maximum image resolution (``longest_edge``); per-source ``max_image_resolution`` still caps it.

        It applies from the next iteration of the train loader (a new segment, as ``set_mixture_weights``).
        """
        self.max_resolution = longest_edge
        self._update_train_stream()

    def set_max_seq_len(self, max_seq_len: int) -> None:
        """New packed row length (a stage's sequence length; per-source ``max_seq_len`` still caps each
        document). Reaches workers when the train loader is iterated again, like ``set_mixture_weights``."""
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive; got {max_seq_len}.")
        self.max_seq_len = max_seq_len
        self._update_train_stream()

    def record_stats(self) -> dict[str, RecordStats]:
        """Records read and skipped (by reason) per source, plus ``encoding`` and ``packing`` skips."""
        return {} if self._train_loader is None else self._train_loader.record_stats()

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture_weights": self.mixture_weights,
            "max_resolution": self.max_resolution,
            "max_seq_len": self.max_seq_len,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixture_weights = state_dict.get("mixture_weights")
        self.max_resolution = state_dict.get("max_resolution")
        self.max_seq_len = state_dict.get("max_seq_len", self.max_seq_len)
