"""Miniature shards in the exact on-disk format of every source, filled with learnable content.

``write_shards(source, out_dir, n_samples, seed=0, **options)`` is what tests, notebooks and the demo call;
the per-format writers live in ``synthetic_web`` (OBELICS, LAION-COCO) and ``synthetic_docs``
(PDFA, IDL, RenderedText, The Cauldron, Docmatix, text-only), their content in
``synthetic_content`` (coloured shapes to count and name, rendered words to read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.synthetic_docs import WRITERS as DOC_WRITERS
from datamodules.synthetic_web import WRITERS as WEB_WRITERS

WRITERS = {**WEB_WRITERS, **DOC_WRITERS}


def write_shards(
    source: str, out_dir: str | Path, n_samples: int, seed: int = 0, **options: Any
) -> list[Path]:
    """Write ``n_samples`` records of ``source`` under ``out_dir``; returns the shard paths written.

    ``options`` go to the source's writer (``cauldron``: ``layout="random"`` for distinct images)."""
    if source not in WRITERS:
        raise ValueError(f"No synthetic writer for source {source!r}; known: {', '.join(sorted(WRITERS))}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return WRITERS[source](out_dir, n_samples, seed, **options)
