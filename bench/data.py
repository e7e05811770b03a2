"""Data pipeline throughput per source, and packing efficiency on OBELICS-like documents.

1. Per source: miniature shards in the real format (``write_shards``) are read (``iter_samples``:
   decoding, PDF rendering) and encoded (``SampleEncoder``: image processing at 64/128 px tiles,
   tokenisation with the tiny tokenizer, labels); samples/s and tokens/s of read + encode.
2. Packing: documents with lognormal text lengths (median ~400 tokens, capped at 4000) and 0-4
   images of 64 tokens (one tile each) packed into rows of 2048 tokens and at most 64 tiles; the
   reference is padded batching (one document per row, batches padded to their longest row).

Last line: JSON list of measures (``measure, ours, reference, unit, ratio, goal``).
"""

from __future__ import annotations

import json
import random
import tempfile
import time

from datamodules.encoding import SampleEncoder
from datamodules.packing import TokenizedDocument, collate_rows, pack, packing_efficiency, split_document
from datamodules.sources import iter_samples
from datamodules.synthetic import WRITERS, write_shards
from vlm.processing import build_processor

SEQ_LEN, IMAGE_TOKEN, IMAGE_TOKENS, BATCH = 2048, 2, 64, 8


def documents(n: int, seed: int = 0) -> list[TokenizedDocument]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        n_images = rng.randint(0, 4)
        ids = [1] * int(min(rng.lognormvariate(6.0, 0.8), 4000)) + [IMAGE_TOKEN] * (IMAGE_TOKENS * n_images)
        docs.append(TokenizedDocument(ids, ids, tiles_per_image=[1] * n_images))
    return docs


def pipeline_throughput(n_samples: int = 48) -> list[dict]:
    """Read + encode samples/s and tokens/s of every source on its miniature shards."""
    processor = build_processor("tiny", {"recipe": "idefics3", "tile_size": 64, "longest_edge": 128}, 16)
    measures = []
    print(f"{'source':<15}{'samples/s':>12}{'tokens/s':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for source in sorted(WRITERS):
            paths = write_shards(source, f"{folder}/{source}", n_samples, seed=0)
            shards = [str(p) for p in paths if p.suffix in {".tar", ".parquet"}]
            encoder = SampleEncoder(processor, training=False)
            start = time.perf_counter()
            documents_ = [doc for doc in map(encoder, iter_samples(source, shards)) if doc is not None]
            seconds = time.perf_counter() - start
            tokens = sum(len(doc) for doc in documents_)
            print(f"{source:<15}{len(documents_) / seconds:>12.1f}{tokens / seconds:>12.0f}")
            measures += [
                {"measure": f"{source} read+encode", "ours": round(len(documents_) / seconds, 1),
                 "reference": None, "unit": "samples/s", "ratio": None, "goal": None},
                {"measure": f"{source} read+encode", "ours": round(tokens / seconds),
                 "reference": None, "unit": "tokens/s", "ratio": None, "goal": None},
            ]  # fmt: skip
    return measures


def main() -> None:
    measures = pipeline_throughput()
    docs = documents(5000)
    start = time.perf_counter()
    windows = [w for doc in docs for w in split_document(doc, SEQ_LEN, IMAGE_TOKEN, [IMAGE_TOKEN])]
    rows = []
    for first in range(0, len(windows), 256):  # windows of 256 documents, as RowPacker packs them
        rows += pack(windows[first : first + 256], SEQ_LEN, max_tiles=64)
    batches = [collate_rows(rows[i : i + BATCH], 0, SEQ_LEN) for i in range(0, len(rows), BATCH)]
    seconds = time.perf_counter() - start
    packed = sum(float((b["document_ids"] > 0).sum()) for b in batches) / (len(rows) * SEQ_LEN)
    padded_rows = [[w] for w in windows]
    padded = sum(
        packing_efficiency(collate_rows(padded_rows[i : i + BATCH], 0)) * len(padded_rows[i : i + BATCH])
        for i in range(0, len(padded_rows), BATCH)
    ) / len(padded_rows)
    print(f"packed {len(docs)} documents into {len(rows)} rows of {SEQ_LEN}: {packed:.1%} real tokens")
    print(f"padded batching (batch {BATCH}, pad to longest): {padded:.1%} real tokens")
    print(f"split + pack + collate: {len(docs) / seconds:.0f} documents/s")
    print(
        json.dumps(
            [
                *measures,
                {
                    "measure": "packing efficiency (non-padding token fraction)",
                    "ours": round(packed, 4),
                    "reference": round(padded, 4),
                    "unit": "fraction",
                    "ratio": round(packed / padded, 3),
                    "goal": ">= 0.97",
                },
                {
                    "measure": "documents/s (split+pack+collate)",
                    "ours": round(len(docs) / seconds),
                    "reference": None,  # no reference pipeline packs; reported for regressions
                    "unit": "1/s",
                    "ratio": None,
                    "goal": None,
                },
            ]
        )
    )


if __name__ == "__main__":
    main()
