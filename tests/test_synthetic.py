"""The public pair ``write_shards`` -> ``iter_samples`` works for every source, with nothing lost."""

from __future__ import annotations

import pytest
from PIL import Image

from datamodules import Sample
from datamodules.sources import READERS, iter_samples
from datamodules.synthetic import WRITERS, write_shards


def test_every_reader_has_a_writer():
    built_in = {name for name, reader in READERS.items() if reader.__module__.startswith("datamodules.")}
    assert set(WRITERS) == built_in  # (tests register fake readers of their own)


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_written_shards_read_back_with_only_deliberate_filters(source, tmp_path):
    paths = write_shards(source, tmp_path, n_samples=6, seed=1)
    shards = [str(p) for p in paths if p.suffix in {".tar", ".parquet"}]
    stream = iter_samples(source, shards)
    samples = list(stream)
    assert len(samples) >= 6
    assert all(isinstance(sample, Sample) and sample.source == source for sample in samples)
    assert len({sample.key for sample in samples}) == len(samples)
    assert all(reason.startswith("filtered:") for reason in stream.stats.skipped), stream.stats.as_dict()
    if source != "text":
        assert all(isinstance(image, Image.Image) for sample in samples for image in sample.images)
        assert sum(len(sample.images) for sample in samples) >= len(samples)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="laion_coco"):
        write_shards("laion-5b", tmp_path, 3)
    with pytest.raises(ValueError, match="laion_coco"):
        iter_samples("laion-5b", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope"):
        iter_samples("laion_coco", str(tmp_path / "nope-*.tar"))
