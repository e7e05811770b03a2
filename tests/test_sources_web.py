"""OBELICS and LAION-COCO readers, image stores and miniature-shard writers
(docs/DATA_FORMATS.md §1, 2, 7, 8)."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import pickle
import random
import re
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from datamodules import synthetic_web as web
from datamodules.shard_files import write_tar
from datamodules.sources import iter_samples, laion_coco
from datamodules.sources.image_store import HttpImageStore, LocalImageStore
from datamodules.sources.obelics import END_OF_DOCUMENT, ImageNode, split_documents

assert laion_coco  # imported to register "laion_coco" (obelics registers via the import above)


def _read(source: str, shards: list[Path], **options) -> tuple[list, dict]:
    stream = iter_samples(source, [str(shard) for shard in shards], **options)
    return list(stream), stream.stats.as_dict()


def _jpeg(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="JPEG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A PNG whose header announces 60000 x 60000 pixels (no pixel data)."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _truncate(path: Path, record: int) -> Path:
    """Cut ``path`` in the middle of the data of the first member of its ``record``-th record."""
    with tarfile.open(path) as tar:
        keys, cut = [], None
        for info in tar.getmembers():
            key = info.name.removeprefix("./").split(".")[0]
            if info.isreg() and key not in keys:
                keys.append(key)
                if len(keys) == record + 1:
                    cut = info.offset_data + info.size // 2
                    break
    truncated = path.with_name("truncated-" + path.name)
    truncated.write_bytes(path.read_bytes()[:cut])
    return truncated


def _webdataset_records(shard: Path) -> list[dict]:
    """The records the real ``webdataset`` library groups ``shard`` into."""
    return list(webdataset.WebDataset(str(shard), shardshuffle=False, empty_check=False))


# --------------------------------------------------------------------------------------------- writers


def test_obelics_parquet_schema_and_dirty_rows(tmp_path: Path) -> None:
    shards = web.write_obelics_parquet(tmp_path, 6, seed=0, n_shards=2)
    assert [
        re.fullmatch(r"train-0000[01]-of-00002-[0-9a-f]{16}\.parquet", p.name) is not None for p in shards
    ] == [
        True,
        True,
    ]
    schema = pq.read_schema(shards[0])
    assert schema.names == ["images", "metadata", "general_metadata", "texts"]
    assert schema.types == [pa.list_(pa.string()), pa.string(), pa.string(), pa.list_(pa.string())]
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["images"] == {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}
    rows = pq.read_table(shards[0]).to_pylist() + pq.read_table(shards[1]).to_pylist()
    for row in rows:
        metadata = json.loads(row["metadata"])
        assert len(row["images"]) == len(row["texts"]) == len(metadata)
        assert all((image is None) != (text is None) for image, text in zip(row["images"], row["texts"]))
        assert all((info is None) == (image is None) for info, image in zip(metadata, row["images"]))
    assert END_OF_DOCUMENT in " ".join(t for t in rows[0]["texts"] if t)
    assert rows[1]["texts"][1:4] == [None, None, None]  # three consecutive images
    assert (
        "alt_text" not in json.loads(rows[2]["metadata"])[1] and "src" in json.loads(rows[2]["metadata"])[1]
    )
    assert rows[3]["general_metadata"] == "[]"
    assert json.loads(rows[4]["general_metadata"]).keys() == {
        "url",
        "warc_filename",
        "warc_record_offset",
        "warc_record_length",
    }


def test_m4_tar_members(tmp_path: Path) -> None:
    for shard in web.write_obelics_tars(tmp_path / "docs", 5) + web.write_pair_tars(tmp_path / "pairs", 4):
        assert re.fullmatch(r"shard_\d{7}\.tar", shard.name)
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert names[0] == "." and names == sorted(names)
        pattern = (
            r"\./\d+_[0-9a-f-]{36}\.(\d+\.text\.txt|\d+\.image\.jpeg|metadata\.txt|image\.jpeg|text\.txt)"
        )
        assert all(re.fullmatch(pattern, name) for name in names[1:])
        assert len(_webdataset_records(shard)) == len({name.split(".")[1] for name in names[1:]})


def test_img2dataset_layout(tmp_path: Path) -> None:
    rows = web.laion_coco_rows(7)
    (shard,) = web.write_laion_coco_tars(tmp_path, 7)
    assert shard.name == "00000.tar" and (tmp_path / "00000_stats.json").exists()
    table = pq.read_table(tmp_path / "00000.parquet")
    for name in ("key", "status", "error_message", "exif", "sha256", "url", "caption", "TEXT"):
        assert table.schema.field(name).type == pa.string()
    for name in ("width", "height", "original_width", "original_height"):
        assert table.schema.field(name).type == pa.int32()
    assert table.num_rows == len(rows) == 9  # all input rows, failed downloads included
    failed = [r["key"] for r in table.to_pylist() if r["status"] == "failed_to_download"]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    keys = sorted({name.split(".")[0] for name in names})
    assert (
        all(re.fullmatch(r"\d{9}", key) for key in keys)
        and len(keys) == 7
        and failed
        and set(failed).isdisjoint(keys)
    )
    assert names[:3] == [f"{keys[0]}.jpg", f"{keys[0]}.json", f"{keys[0]}.txt"]
    assert [record["__key__"] for record in _webdataset_records(shard)] == keys
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (9, 7, 2)


# --------------------------------------------------------------------------------------------- readers


def test_obelics_parquet_and_tars_read_the_same_documents(tmp_path: Path) -> None:
    parquet = web.write_obelics_parquet(tmp_path / "hub", 6)
    from_parquet, stats = _read("obelics", parquet, image_store=LocalImageStore(tmp_path / "hub" / "images"))
    assert stats == {"read": 7}  # 6 documents, the first split in two at END_OF_DOCUMENT
    from_tars, stats = _read("obelics", web.write_obelics_tars(tmp_path / "m4", 6))
    assert stats == {"read": 7}
    assert sorted(s.text for s in from_parquet) == sorted(s.text for s in from_tars)
    first, second = from_parquet[:2]
    assert first.key.endswith("#0/0") and second.key.endswith("#0/1")
    assert second.content[0].startswith("Next post") and END_OF_DOCUMENT not in first.text + second.text
    assert [isinstance(item, Image.Image) for item in from_parquet[2].content] == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert (
        from_parquet[2].meta["url"].startswith("https://blog1")
        and len(from_parquet[2].meta["image_urls"]) == 3
    )
    assert from_parquet[3].meta["images"][0].get("alt_text") is None
    assert all(isinstance(item, str | Image.Image) for sample in from_tars for item in sample.content)


def test_split_documents() -> None:
    a, b = ImageNode(url="a"), ImageNode(url="b")
    nodes = ["intro", a, f"end one\n\n{END_OF_DOCUMENT}\n\nstart two", b, f"tail\n\n{END_OF_DOCUMENT}"]
    assert split_documents(nodes) == [["intro", a, "end one"], ["start two", b, "tail"]]
    assert split_documents([a, f"x {END_OF_DOCUMENT} y {END_OF_DOCUMENT} z", b]) == [
        [a, "x"],
        ["y"],
        ["z", b],
    ]


def test_obelics_filters(tmp_path: Path) -> None:
    shards = web.write_obelics_tars(tmp_path, 6)
    too_many = sum(sum(kind == "image" for kind, _, _ in nodes) > 2 for nodes in web.obelics_documents(6))
    samples, stats = _read("obelics", shards, max_images_per_document=2)
    assert too_many and stats == {"read": 7 - too_many, "filtered:too_many_images": too_many}
    samples, stats = _read("obelics", shards, perplexity_scorer=lambda text: len(text), max_perplexity=150)
    assert stats["read"] + stats["filtered:perplexity"] == 7 and all(len(s.text) <= 150 for s in samples)
    eod = [(f"{i}.text.txt", f"text {END_OF_DOCUMENT} more".encode()) for i in (0,)]
    members = {**dict(eod), "1.image.jpeg": _jpeg()}
    members["metadata.txt"] = "\n".join(f"d.{name}" for name in members).encode()
    write_tar(tmp_path / "eod.tar", [("d", members)], dot_slash=True)
    samples, stats = _read("obelics", [tmp_path / "eod.tar"])
    assert stats == {"read": 1, "filtered:no_image_after_split": 1} and samples[0].content[0] == "more"
    with pytest.raises(ValueError, match="perplexity"):
        _read("obelics", shards, perplexity_scorer=len)


def test_obelics_bad_records_skipped_and_counted(tmp_path: Path) -> None:
    def doc(image: bytes | None, listed_extra: str = "", suffix: str = "1.image.jpeg") -> dict[str, bytes]:
        members = {"0.text.txt": b"Some text."} | ({suffix: image} if image is not None else {})
        names = [*members, *([listed_extra] if listed_extra else [])]
        return members | {"metadata.txt": "\n".join(f"{{id}}.{name}" for name in names).encode()}

    docs = {
        "a0": doc(_jpeg()),
        "b1": doc(b"not an image"),
        "c2": doc(b""),
        "d3": doc(_bomb()),
        "e4": doc(_jpeg(), listed_extra="2.image.jpeg"),
        "f5": doc(_jpeg(), suffix="1.picture.png"),
        "g6": {"0.text.txt": b"no metadata", "1.image.jpeg": _jpeg()},
        "h7": doc(_jpeg()),
    }
    records = [
        (k, {n: v.replace(b"{id}", k.encode()) if n == "metadata.txt" else v for n, v in m.items()})
        for k, m in docs.items()
    ]
    shard = write_tar(tmp_path / "shard_0000000.tar", records, dot_slash=True)
    samples, stats = _read("obelics", [shard])
    assert [s.meta["id"] for s in samples] == ["a0", "h7"]
    assert stats == {"read": 2, "corrupt_image": 3, "missing_members": 2, "unknown_schema": 1}
    samples, stats = _read("obelics", [_truncate(shard, 4)])
    assert stats == {"read": 1, "corrupt_image": 3, "truncated_tar": 1}


def test_obelics_parquet_dirty_rows(tmp_path: Path) -> None:
    good = web.write_obelics_parquet(tmp_path, 2, n_shards=1)[0]
    rows = pq.read_table(good).to_pylist()
    dead = web.scene_url(web.random_scene(random.Random(0)), random.Random(0), dead=True)
    bad = [
        {"images": None, "metadata": None, "general_metadata": None, "texts": None},
        {**rows[1], "metadata": "{not json"},
        {**rows[1], "general_metadata": "[]", "metadata": None},
        {**rows[1], "images": rows[1]["images"][:-1]},
        {"images": [dead, None], "metadata": "[null, null]", "general_metadata": "{}", "texts": [None, "x"]},
    ]
    path = tmp_path / "dirty.parquet"
    pq.write_table(pa.Table.from_pylist(rows + bad, schema=web.OBELICS_SCHEMA), path)
    store = LocalImageStore(tmp_path / "images")
    samples, stats = _read("obelics", [path], image_store=store)
    assert stats == {"read": 4, "null_row": 1, "invalid_json": 1, "malformed_row": 1, "missing_image": 1}
    assert samples[-1].meta["url"] is None
    _, stats = _read("obelics", [path], image_store=store, drop_bad_images=True)
    assert stats["dropped_image:missing_image"] == 1 and stats["filtered:no_image"] == 1
    with pytest.raises(ValueError, match="image_store"):
        _read("obelics", [path])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        _read("obelics", [tmp_path / "other.parquet"], image_store=store)


def test_laion_coco_all_formats_and_captions(tmp_path: Path) -> None:
    rows = web.laion_coco_rows(10)
    live = [row for row in rows if "/dead/" not in row["URL"]]
    samples, stats = _read("laion_coco", web.write_laion_coco_tars(tmp_path / "i2d", 10))
    assert stats == {"read": 10} and [s.content[1] for s in samples] == [r["top_caption"] for r in live]
    samples, _ = _read("laion_coco", [tmp_path / "i2d" / "00000.tar"], caption="alt_text")
    assert [s.content[1] for s in samples] == [r["TEXT"] for r in live]
    samples, stats = _read("laion_coco", web.write_pair_tars(tmp_path / "m4", 10))
    assert stats == {"read": 10} and sorted(s.content[1] for s in samples) == sorted(
        r["top_caption"] for r in live
    )
    metadata = web.write_laion_coco_metadata(tmp_path / "meta", 10)
    assert re.fullmatch(r"part-00000-[0-9a-f-]{36}-c000\.snappy\.parquet", metadata[0].name)
    assert pq.read_schema(metadata[0]) == web.LAION_COCO_SCHEMA
    store = LocalImageStore(tmp_path / "meta" / "images")
    samples, stats = _read("laion_coco", metadata, image_store=store)
    assert stats == {"read": 10, "missing_image": 2} and samples[0].meta["url"] == live[0]["URL"]
    assert all(isinstance(s.content[0], Image.Image) and s.content[0].size == (96, 64) for s in samples)


def test_laion_coco_filters(tmp_path: Path) -> None:
    rows = [row for row in web.laion_coco_rows(10) if "/dead/" not in row["URL"]]
    nsfw = sum(row["punsafe"] > 0.5 for row in rows)
    watermark = sum(row["punsafe"] <= 0.5 and (row["pwatermark"] or 0) > 0.5 for row in rows)
    shards = web.write_laion_coco_tars(tmp_path, 10)
    _, stats = _read("laion_coco", shards, max_punsafe=0.5, max_pwatermark=0.5)
    assert (
        nsfw
        and watermark
        and stats == {"read": 10 - nsfw - watermark, "filtered:nsfw": nsfw, "filtered:watermark": watermark}
    )
    _, stats = _read("laion_coco", shards, min_image_side=65)
    assert stats == {"filtered:small_image": 10, "read": 0}


def test_laion_coco_bad_records_skipped_and_counted(tmp_path: Path) -> None:
    def record(image: bytes | None, meta: bytes = b'{"caption": "c"}') -> dict[str, bytes]:
        return ({"jpg": image} if image is not None else {}) | {"json": meta, "txt": b"A caption."}

    records = [
        ("000000000", record(_jpeg())),
        ("000000001", record(b"garbage")),
        ("000000002", record(b"")),
        ("000000003", record(_bomb())),
        ("000000004", record(_jpeg(), b"{broken")),
        ("000000005", record(None)),
        ("000000006", {"bin": b"x"}),
        ("000000008", record(_jpeg())),
    ]
    shard = write_tar(tmp_path / "00000.tar", records)
    samples, stats = _read("laion_coco", [shard])
    assert [s.key.rsplit("#")[1] for s in samples] == ["000000000", "000000008"]
    assert stats == {
        "read": 2,
        "corrupt_image": 3,
        "invalid_json": 1,
        "missing_members": 1,
        "unknown_schema": 1,
    }
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name, data in [
            ("a.jpg", _jpeg()),
            ("a.txt", b"x"),
            ("a.txt", b"y"),
            ("b.jpg", _jpeg()),
            ("b.txt", b"z"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, stats = _read("laion_coco", [tmp_path / "dup.tar"])
    assert stats == {"read": 1, "duplicate_member": 1} and samples[0].content[1] == "z"
    _, stats = _read("laion_coco", [_truncate(shard, 3)])
    assert stats == {"read": 1, "corrupt_image": 2, "truncated_tar": 1}
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    assert _read("laion_coco", [tmp_path / "junk.tar"])[1] == {"read": 0, "corrupt_tar": 1}


def test_missing_shard_fails_fast_with_its_path(tmp_path: Path) -> None:
    for source in ("obelics", "laion_coco"):
        with pytest.raises(FileNotFoundError, match=r"nowhere\.tar"):
            _read(source, [tmp_path / "nowhere.tar"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LocalImageStore(tmp_path / "nowhere")
    (shard,) = web.write_obelics_tars(tmp_path, 2)
    renamed = shard.rename(tmp_path / "docs.bin")
    with pytest.raises(ValueError, match="format="):
        _read("obelics", [renamed])
    assert _read("obelics", [renamed], format="tar")[1] == {"read": 3}


# --------------------------------------------------------------------------------------------- image stores


def test_local_image_store(tmp_path: Path) -> None:
    rows = web.laion_coco_rows(4)
    web.write_laion_coco_metadata(tmp_path, 4)
    store = LocalImageStore(tmp_path / "images")
    for row in rows:
        expected = web.image_for_url(row["URL"])
        assert store.get(row["URL"]) == expected and (expected is None) == ("/dead/" in row["URL"])
    assert store.get("https://elsewhere.example.com/x.jpg") is None
    assert pickle.loads(pickle.dumps(store)).get(rows[0]["URL"]) == web.image_for_url(rows[0]["URL"])


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self) -> None:
        hits = _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path == "/slow.jpg":
            time.sleep(0.5)
        if self.path == "/missing.jpg" or (self.path == "/flaky.jpg" and hits == 1):
            self.send_error(404 if self.path == "/missing.jpg" else 503)
            return
        body = _jpeg()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client of /slow.jpg timed out and left
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.hits.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_image_store(http_root: str, tmp_path: Path) -> None:
    store = HttpImageStore(timeout=0.2, retries=1, backoff=0.01, cache_dir=tmp_path / "cache")
    assert store.get(f"{http_root}/ok.jpg") == _jpeg()
    assert store.get(f"{http_root}/ok.jpg") == _jpeg() and _Handler.hits["/ok.jpg"] == 1  # cached
    assert store.cache_path(f"{http_root}/ok.jpg").read_bytes() == _jpeg()
    assert (
        store.get(f"{http_root}/missing.jpg") is None and _Handler.hits["/missing.jpg"] == 1
    )  # 404: no retry
    assert store.get(f"{http_root}/flaky.jpg") == _jpeg() and _Handler.hits["/flaky.jpg"] == 2  # 503: retried
    started = time.monotonic()
    assert store.get(f"{http_root}/slow.jpg") is None and _Handler.hits["/slow.jpg"] == 2
    assert time.monotonic() - started < 1.0
    assert store.get("file:///etc/passwd") is None
