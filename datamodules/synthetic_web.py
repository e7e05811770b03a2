"""Faithful miniature OBELICS and LAION-COCO shards (docs/DATA_FORMATS.md §1, §2, §7, §8), filled with shapes.

Every image is a shapes scene (``synthetic_content``) whose caption says what it shows; its URL
(``https://images.example.com/<colour>-<count>-<shape>-<8 hex>.jpg``) encodes the scene, so
``image_for_url`` re-renders the same JPEG anywhere: ``write_img2dataset`` "downloads" them into an
img2dataset directory that serves as the ``LocalImageStore`` of the parquet writers. URLs under
``/dead/`` fail to download (404), as 20-40 % of real LAION URLs do.

Writers take ``(out_dir, n_samples, seed)`` and are deterministic in ``seed``. ``n_samples`` counts
documents for OBELICS (a document holding ``END_OF_DOCUMENT_TOKEN_TO_BE_REPLACED`` reads as two
Samples) and downloadable images for LAION-COCO (dead-URL rows come on top). Dirty cases of the real
data are included: an end-of-document marker, three consecutive images, image metadata without the
optional keys, a ``general_metadata`` of ``"[]"`` (OBELICS; first documents), dead URLs, hence failed
rows in the img2dataset parquet and gaps in the tar keys, null ``pwatermark`` (LAION-COCO).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datamodules.shard_files import hub_parquet_name, write_parquet, write_tar
from datamodules.sources.obelics import END_OF_DOCUMENT
from datamodules.synthetic_content import ShapeScene, draw_scene, random_scene, random_words

IMAGE_HOST = "https://images.example.com"
_SCENE_URL = re.compile(r"/(\w+)-(\d)-(\w+)-[0-9a-f]{8}\.jpg$")
_STRING = {"dtype": "string", "_type": "Value"}
OBELICS_SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.string())),
        ("metadata", pa.string()),
        ("general_metadata", pa.string()),
        ("texts", pa.list_(pa.string())),
    ]
)
OBELICS_FEATURES = {
    "images": {"feature": _STRING, "_type": "Sequence"},
    "metadata": _STRING,
    "general_metadata": _STRING,
    "texts": {"feature": _STRING, "_type": "Sequence"},
}
LAION_COCO_SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("top_caption", pa.string()),
        ("all_captions", pa.list_(pa.string())),
        ("all_similarities", pa.list_(pa.float64())),
        ("WIDTH", pa.int64()),
        ("HEIGHT", pa.int64()),
        ("similarity", pa.float64()),
        ("hash", pa.int64()),
        ("pwatermark", pa.float64()),
        ("punsafe", pa.float64()),
    ]
)
IMG2DATASET_FIELDS = [
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]


def scene_url(scene: ShapeScene, rng: random.Random, dead: bool = False) -> str:
    """A URL naming ``scene`` (under ``/dead/`` when its download must fail)."""
    path = f"{scene.colour}-{scene.count}-{scene.shape}-{rng.getrandbits(32):08x}.jpg"
    return f"{IMAGE_HOST}/{'dead/' if dead else ''}{path}"


def image_for_url(url: str) -> bytes | None:
    """The JPEG "served" at a ``scene_url`` (``None`` for dead URLs), rendered deterministically from it."""
    match = _SCENE_URL.search(url)
    if match is None or "/dead/" in url:
        return None
    scene = ShapeScene(shape=match[3], colour=match[1], count=int(match[2]))
    buffer = io.BytesIO()
    draw_scene(scene, random.Random(url)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _split(items: list, n_shards: int) -> list[list]:
    n_shards = max(1, min(n_shards, len(items)))
    return [items[i * len(items) // n_shards : (i + 1) * len(items) // n_shards] for i in range(n_shards)]


# --------------------------------------------------------------------------------------------- img2dataset


def write_img2dataset(
    out_dir: Path,
    rows: list[dict],
    url_col: str = "url",
    caption_col: str | None = None,
    save_additional_columns: tuple[str, ...] = (),
    n_shards: int = 1,
) -> list[Path]:
    """What ``img2dataset --output_format webdataset`` writes for ``rows``; returns the tar paths.

    Per shard ``{N:05d}.tar`` (``{key}.jpg``, ``{key}.json``, ``{key}.txt`` when ``caption_col`` is
    given; 9-digit keys ``shard * 10**4 + row``, absent for failed rows), ``{N:05d}.parquet`` (every
    input row, ``url_col``/``caption_col`` renamed ``url``/``caption``, int32 sizes) and
    ``{N:05d}_stats.json``. Images are resized with ``resize_mode="no"`` (original size kept).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [*save_additional_columns, *(["caption"] if caption_col else []), "url"]
    renamed = {url_col: "url", **({caption_col: "caption"} if caption_col else {})}
    inputs = pa.Table.from_pylist([{renamed.get(k, k): v for k, v in row.items()} for row in rows])
    tars = []
    for shard_id, shard_rows in enumerate(_split(inputs.select(columns).to_pylist(), n_shards)):
        records, results, status_dict = [], [], {}
        for index, row in enumerate(shard_rows):
            key = str(shard_id * 10**4 + index).zfill(9)
            jpeg = image_for_url(row["url"])
            result = dict(row, key=key, status="success", error_message=None, exif="{}")
            if jpeg is None:
                result.update(
                    status="failed_to_download", error_message="HTTP Error 404: Not Found", exif=None
                )
                status_dict[result["error_message"]] = status_dict.get(result["error_message"], 0) + 1
            else:
                width, height = Image.open(io.BytesIO(jpeg)).size
                result.update(width=width, height=height, original_width=width, original_height=height)
                result["sha256"] = hashlib.sha256(jpeg).hexdigest()
                members = {"jpg": jpeg, "json": json.dumps(result, indent=4).encode()}
                if caption_col:
                    members["txt"] = row["caption"].encode()
                records.append((key, members))
            results.append(result)
        schema = pa.schema([*inputs.select(columns).schema, *IMG2DATASET_FIELDS])
        pq.write_table(pa.Table.from_pylist(results, schema=schema), out_dir / f"{shard_id:05d}.parquet")
        successes = sum(result["status"] == "success" for result in results)
        stats = {
            "count": len(results),
            "successes": successes,
            "failed_to_download": len(results) - successes,
            "failed_to_resize": 0,
            "duration": 1.0,
            "start_time": 1700000000.0,
            "end_time": 1700000001.0,
            "status_dict": {"success": successes, **status_dict},
        }
        (out_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        tars.append(write_tar(out_dir / f"{shard_id:05d}.tar", records))
    return tars


# --------------------------------------------------------------------------------------------- OBELICS


def obelics_documents(n_documents: int, seed: int = 0) -> list[list[tuple[str, str, dict | None]]]:
    """Documents as ``[("text", text, None) | ("image", url, metadata dict)]``; the dirty ones first.

    Each starts with a title, then alternates an image and its caption. Document 0 has an end-of-document
    marker between its two images, 1 three consecutive images, 2 image metadata without the optional
    keys, 3 a ``general_metadata`` of ``"[]"`` (in the parquet).
    """
    rng = random.Random(seed)
    documents = []
    for index in range(n_documents):
        page = f"https://blog{index}.example.org/post-{rng.getrandbits(24):06x}.html"
        scenes = [
            random_scene(rng) for _ in range(3 if index == 1 else 2 if index == 0 else rng.randint(1, 3))
        ]
        nodes: list[tuple[str, str, dict | None]] = [("text", f"About {random_words(rng, 3)}.", None)]
        for position, scene in enumerate(scenes):
            url = scene_url(scene, rng)
            info = {
                "document_url": page,
                "unformatted_src": "/" + url.rsplit("/", 1)[1],
                "src": url,
                "original_width": 96,
                "original_height": 64,
                "format": "jpeg",
            }
            if index != 2:
                info.update(
                    formatted_filename=url.rsplit("/", 1)[1][:-4],
                    alt_text=scene.caption,
                    rendered_width=96,
                    rendered_height=64,
                )
            text = f"{scene.caption} {random_words(rng, 6).capitalize()}."
            if index == 0 and position == 0:
                text += f"\n\n{END_OF_DOCUMENT}\n\nNext post: {random_words(rng, 4)}."
            nodes += [("image", url, info), ("text", text, None)]
        if index == 1:  # the images first, then their captions (merged as OBELICS merges consecutive texts)
            captions = "\n\n".join(text for kind, text, _ in nodes[1:] if kind == "text")
            nodes = [nodes[0], *(node for node in nodes if node[0] == "image"), ("text", captions, None)]
        documents.append(nodes)
    return documents


def write_obelics_parquet(
    out_dir: Path, n_samples: int, seed: int = 0, n_shards: int = 2, image_store: bool = True
) -> list[Path]:
    """Hub-style OBELICS parquet ``train-0000i-of-0000n-<16 hex>.parquet`` (exact Arrow types and
    ``huggingface`` metadata); with ``image_store`` the images of its URLs go to ``out_dir/images``
    (img2dataset layout), to be read with ``LocalImageStore(out_dir / "images")``."""
    documents = obelics_documents(n_samples, seed)
    rows = []
    for index, nodes in enumerate(documents):
        page = {
            "url": nodes[1][2]["document_url"] if len(nodes) > 1 else None,
            "warc_filename": f"crawl-data/CC-MAIN-2022-49/warc/CC-MAIN-{index:05d}.warc.gz",
            "warc_record_offset": 1000 * index,
            "warc_record_length": 5000 + index,
        }
        rows.append(
            {
                "images": [value if kind == "image" else None for kind, value, _ in nodes],
                "metadata": json.dumps([info for _, _, info in nodes]),
                "general_metadata": "[]" if index == 3 else json.dumps(page),
                "texts": [value if kind == "text" else None for kind, value, _ in nodes],
            }
        )
    if image_store:
        urls = [value for nodes in documents for kind, value, _ in nodes if kind == "image"]
        write_img2dataset(out_dir / "images", [{"url": url} for url in dict.fromkeys(urls)])
    chunks = _split(rows, n_shards)
    return [
        write_parquet(
            hub_parquet_name(out_dir, i, len(chunks), seed), chunk, OBELICS_SCHEMA, OBELICS_FEATURES
        )
        for i, chunk in enumerate(chunks)
    ]


def write_obelics_tars(out_dir: Path, n_samples: int, seed: int = 0, n_shards: int = 1) -> list[Path]:
    """m4 web-document tars ``shard_000000i.tar`` (§7.1): ``./{id}.{i}.text.txt``, ``./{id}.{i}.image.jpeg``,
    ``./{id}.metadata.txt``, ``tar --sort=name`` order with a ``./`` entry; ids ``{index}_{uuid4}``."""
    rng = random.Random(seed + 1)
    records = []
    for index, nodes in enumerate(obelics_documents(n_samples, seed)):
        members = {}
        for i, (kind, value, _) in enumerate(nodes):
            if kind == "image":
                members[f"{i}.image.jpeg"] = image_for_url(value)
            else:
                members[f"{i}.text.txt"] = value.encode()
        doc_id = f"{index}_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        members["metadata.txt"] = "\n".join(f"{doc_id}.{name}" for name in members).encode()
        records.append((doc_id, members))
    return [
        write_tar(out_dir / f"shard_{i:07d}.tar", chunk, dot_slash=True)
        for i, chunk in enumerate(_split(records, n_shards))
    ]


# --------------------------------------------------------------------------------------------- LAION-COCO


def laion_coco_rows(n_samples: int, seed: int = 0) -> list[dict]:
    """LAION-COCO metadata rows: ``n_samples`` live URLs plus a dead one after every 6th (and after the
    first); row 1 has a null ``pwatermark``, every 5th a high ``punsafe``, every 7th a high ``pwatermark``."""
    rng = random.Random(seed)
    rows = []
    for index in range(n_samples):
        for dead in (False, True) if index % 6 == 0 and n_samples > 1 else (False,):
            scene = random_scene(rng)
            captions = [scene.caption, f"A picture of {scene.colour} shapes.", f"Some {scene.shape}s."]
            rows.append(
                {
                    "URL": scene_url(scene, rng, dead=dead),
                    "TEXT": f"{scene.colour} {scene.shape} clipart",
                    "top_caption": scene.caption,
                    "all_captions": captions,
                    "all_similarities": [round(rng.uniform(0.3, 0.4), 4) for _ in captions],
                    "WIDTH": 96,
                    "HEIGHT": 64,
                    "similarity": round(rng.uniform(0.28, 0.35), 4),
                    "hash": rng.getrandbits(62),
                    "pwatermark": None
                    if len(rows) == 1
                    else 0.9
                    if len(rows) % 7 == 6
                    else rng.random() / 10,
                    "punsafe": 0.95 if len(rows) % 5 == 4 else rng.random() / 10,
                }
            )
    return rows


def write_laion_coco_metadata(
    out_dir: Path, n_samples: int, seed: int = 0, n_shards: int = 1, image_store: bool = True
) -> list[Path]:
    """LAION-COCO metadata parquet, Spark-style ``part-0000i-<uuid>-c000.snappy.parquet`` (no
    ``huggingface`` key: not written by ``datasets``); images of its URLs in ``out_dir/images``."""
    rows = laion_coco_rows(n_samples, seed)
    if image_store:
        write_img2dataset(out_dir / "images", rows, url_col="URL", caption_col="top_caption")
    run = uuid.UUID(int=random.Random(seed).getrandbits(128), version=4)
    paths = []
    for i, chunk in enumerate(_split(rows, n_shards)):
        paths.append(out_dir / f"part-{i:05d}-{run}-c000.snappy.parquet")
        pq.write_table(pa.Table.from_pylist(chunk, schema=LAION_COCO_SCHEMA), paths[-1], compression="snappy")
    return paths


def write_laion_coco_tars(out_dir: Path, n_samples: int, seed: int = 0, n_shards: int = 1) -> list[Path]:
    """img2dataset webdataset shards of LAION-COCO (caption_col ``top_caption``; ``TEXT``, ``punsafe``,
    ``pwatermark`` saved as additional columns in the json)."""
    extra = ("TEXT", "punsafe", "pwatermark")
    rows = laion_coco_rows(n_samples, seed)
    return write_img2dataset(
        out_dir, rows, "URL", "top_caption", save_additional_columns=extra, n_shards=n_shards
    )


def write_pair_tars(out_dir: Path, n_samples: int, seed: int = 0, n_shards: int = 1) -> list[Path]:
    """m4 image-caption pair tars (§7.2): ``./{id}.image.jpeg`` + ``./{id}.text.txt``, sorted, with ``./``."""
    rng = random.Random(seed + 1)
    records = []
    for index, row in enumerate(
        row for row in laion_coco_rows(n_samples, seed) if "/dead/" not in row["URL"]
    ):
        pair_id = f"{index}_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        records.append(
            (pair_id, {"image.jpeg": image_for_url(row["URL"]), "text.txt": row["top_caption"].encode()})
        )
    return [
        write_tar(out_dir / f"shard_{i:07d}.tar", chunk, dot_slash=True)
        for i, chunk in enumerate(_split(records, n_shards))
    ]


# The default format per source: OBELICS as m4 tars (its hub parquet needs an image store; use
# ``write_obelics_parquet`` for that layout), LAION-COCO as img2dataset shards.
WRITERS: dict[str, Callable[..., list[Path]]] = {
    "obelics": write_obelics_tars,
    "laion_coco": write_laion_coco_tars,
}
