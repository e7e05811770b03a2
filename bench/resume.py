"""Time to the first batch after a resume: seeking (ours) against replaying the epoch up to the position.

Synthetic LAION-COCO shards (``--samples`` records, img2dataset tars) stream through the real pipeline
(index, partitioned order, image processing, tokenisation, packing; ``VLMDataModule`` settings of
the tiny recipes). For each position N (samples into the epoch):

- replay (the reference: how the stream resumed before, re-reading, decoding and encoding every
  sample before the position): a new process starts the stream at its beginning and consumes
  batches until N samples are behind it, then takes the next batch; its time and its ``state_dict``
  are recorded.
- seek (ours): a new process loads that ``state_dict`` and takes its first batch, which must equal the
  replay's (the script stops otherwise).

Both times run from process start (imports included) to the first batch after the position. The shard
indexes are built once before (``python -m datamodules.index``; both sides use them). Last line: JSON
list of measures (``measure, ours, reference, unit, ratio, goal``).

    python bench/resume.py                       # positions 100, 10000, 100000 (the replay takes minutes)
    python bench/resume.py --positions 100 1000 --samples 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from datamodules.index import index_shards
from datamodules.synthetic import write_shards

SHARD_SAMPLES = 5000
CHILD = r"""
import sys, time, torch
from datamodules import VLMDataModule
root, position, state_in, state_out, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
data = VLMDataModule(
    [{"source": "laion_coco", "urls": f"{root}/*/*.tar", "weight": 1.0, "max_seq_len": 256}],
    image_seq_len=8, image_processor={"shortest_edge": 32, "longest_edge": 64},
    batch_size=8, max_seq_len=256, max_tiles_per_row=16, shuffle_block=64, pack_window=256,
)
loader = data.train_dataloader()
if state_in != "-":
    loader.load_state_dict(torch.load(state_in, weights_only=True))
batches = iter(loader)
if state_in == "-":
    while sum(p.start.draws for p in loader.positions.values()) < position:
        loader.consumed(next(batches))
    torch.save(loader.state_dict(), state_out)
batch = next(batches)
torch.save({"input_ids": batch["input_ids"], "seconds": time.perf_counter()}, out)
"""


def time_child(root: Path, position: int, state_in: str, state_out: Path, out: Path) -> tuple[float, dict]:
    """Seconds from the child's start to its first batch after ``position``, and what it wrote."""
    start = time.perf_counter()
    args = [str(root), str(position), state_in, str(state_out), str(out)]
    subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    result = __import__("torch").load(out, weights_only=True)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--samples", type=int, default=None, help="records written (default: enough)")
    args = parser.parse_args()
    samples = args.samples or max(args.positions) + 5000
    measures = []
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as folder:
        root = Path(folder)
        for shard in tqdm(range(-(-samples // SHARD_SAMPLES)), desc="writing shards", unit="shard"):
            write_shards("laion_coco", root / f"{shard:04d}", min(SHARD_SAMPLES, samples), seed=shard)
        index_shards(f"{root}/*/*.tar")
        print(f"{'position':>10}{'replay s':>12}{'seek s':>10}{'ratio':>8}")
        for position in args.positions:
            state = root / f"state-{position}.pt"
            replay, replayed = time_child(root, position, "-", state, root / "replay.pt")
            seek, sought = time_child(root, position, str(state), root / "unused.pt", root / "seek.pt")
            if not (replayed["input_ids"].shape == sought["input_ids"].shape and
                    bool((replayed["input_ids"] == sought["input_ids"]).all())):  # fmt: skip
                raise SystemExit(f"the batch after seeking to {position} differs from the replayed one")
            print(f"{position:>10}{replay:>12.2f}{seek:>10.2f}{replay / seek:>8.1f}")
            measures.append(
                {
                    "measure": f"time to first batch, resume at {position} samples",
                    "ours": round(seek, 2),
                    "reference": round(replay, 2),
                    "unit": "s",
                    "ratio": round(replay / seek, 1),
                    "goal": "seek at 1e5 within 2x of seek at 1e2",
                }
            )
    print(json.dumps(measures))


if __name__ == "__main__":
    main()
