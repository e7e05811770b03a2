"""Document and conversation readers on faithful miniature shards: formats, content, bad-record accounting."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2 as pdfium
import pytest

import datamodules.sources.conversations
import datamodules.sources.pdf_documents
import datamodules.sources.rendered_text
from datamodules.shard_files import write_parquet, write_tar
from datamodules.sources import RecordStats, iter_samples
from datamodules.sources.conversations import CONVERSATION_SCHEMA, DOCMATIX_PDF_SCHEMA
from datamodules.sources.records import iter_tar_groups
from datamodules.synthetic_docs import HF_FEATURES, WRITERS

FAST = {"dpi": 72}  # rendering options for the PDF readers: small pages, fast tests
N = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("docs")
    return {source: writer(root / source, N, seed=1) for source, writer in WRITERS.items()}


def records(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    return list(iter_tar_groups(str(path), RecordStats()))


def read(source: str, paths, **options):
    stream = iter_samples(source, [str(p) for p in paths], **options)
    return list(stream), stream.stats.as_dict()


def is_dark_somewhere(image) -> bool:
    return image.convert("L").getextrema()[0] < 100


# ------------------------------------------------------------------------------------- file formats


def test_tar_member_names_and_keys(shards):
    patterns = {
        "pdfa": (r"pdfa-eng-train-\d{4}\.tar", r"\d{7}\.(json|pdf)"),
        "idl": (r"idl-train-\d{5}\.tar", r"[a-z]{4}\d{4}\.(json|ocr|pdf|tif)"),
        "rendered_text": (r"\d{6}\.tar", r"\d+\.(json|png)"),
        "m4_sft": (
            r"shard_\d{7}\.tar",
            r"\./\d+_[0-9a-f-]+\.(\d+\.image\.jpeg|\d+\.text\.txt|metadata\.txt)",
        ),
    }
    for source, (shard_name, member_name) in patterns.items():
        (path,) = shards[source]
        assert re.fullmatch(shard_name, path.name)
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
            if source == "m4_sft":
                assert tar.getmembers()[0].isdir() and names == sorted(names)  # the "./" entry
        assert names and all(re.fullmatch(member_name, name) for name in names), (source, names[:4])
    for _, members in records(shards["pdfa"][0]):
        document = pdfium.PdfDocument(members["pdf"])
        pages = json.loads(members["json"])["pages"]
        assert len(document) == len(pages)
        for page in pages:
            assert set(page) == {"images_bbox", "images_bbox_no_text_overlap", "lines", "words"}
            assert set(page["lines"]) == {"text", "bbox", "score", "word_slice"}
            assert set(page["words"]) == {"text", "bbox", "score", "line_pos"}
            for (start, end), line in zip(page["lines"]["word_slice"], page["lines"]["text"]):
                assert " ".join(page["words"]["text"][start:end]) == line
            boxes = page["lines"]["bbox"] + page["words"]["bbox"] + page["images_bbox"]
            assert all(
                0 <= v <= 1 and x + w <= 1 and y + h <= 1 for x, y, w, h in boxes for v in (x, y, w, h)
            )
    for _, members in records(shards["idl"][0]):
        assert all(set(page) == {"text", "bbox", "score"} for page in json.loads(members["json"])["pages"])


def test_parquet_schema_and_hf_metadata(shards):
    cauldron = {p.parent.name for p in shards["cauldron"]}
    assert cauldron == {"clevr", "mimic_cgd"}
    for path in shards["cauldron"] + shards["docmatix"] + shards["text"]:
        assert re.fullmatch(r"train-\d{5}-of-\d{5}-[0-9a-f]{16}\.parquet", path.name)
        schema = pq.read_schema(path)
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        expected = DOCMATIX_PDF_SCHEMA if path.parent.name == "pdf" else CONVERSATION_SCHEMA
        assert schema.names == expected.names and schema.types == expected.types
        assert features["texts"] == [
            {k: {"dtype": "string", "_type": "Value"} for k in ("user", "assistant", "source")}
        ]
        if "images" in schema.names:
            assert features["images"] == {"feature": {"_type": "Image"}, "_type": "Sequence"}
            assert schema.field("images").type == pa.list_(
                pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            )
        else:
            assert schema.field("pdf").type == pa.binary() and features["pdf"]["dtype"] == "binary"
    assert {p.parent.name for p in shards["docmatix"]} == {"data", "pdf"}
    assert all(row == [] for row in pq.read_table(shards["text"][0]).column("images").to_pylist())


# ------------------------------------------------------------------------------------------ content


@pytest.mark.parametrize("source, options", [("pdfa", FAST), ("idl", FAST), ("idl", {"use_tif": True})])
def test_pdf_pages_carry_their_ocr_text(shards, source, options):
    samples, stats = read(source, shards[source], **options)
    docs = {key: members for key, members in records(shards[source][0])}
    expected_pages = [
        (key, i, "\n".join(datamodules.sources.pdf_documents.page_lines(page)))
        for key, members in docs.items()
        for i, page in enumerate(json.loads(members["json"])["pages"])
    ]
    kept = [page for page in expected_pages if page[2]]
    expected_stats = {"read": len(kept)}
    if len(kept) < len(expected_pages):
        expected_stats["filtered:empty_page"] = len(expected_pages) - len(kept)
    assert stats == expected_stats
    for sample, (key, index, text) in zip(samples, kept):
        image, sample_text = sample.content
        assert sample.key.endswith(f"#{key}/{index}") and sample_text == text
        assert is_dark_somewhere(image) and image.mode == "L"
        drawn = pdfium.PdfDocument(docs[key]["pdf"])[index].get_textpage().get_text_range()
        assert drawn.split() == text.split()  # the OCR annotation is exactly what the page shows


def test_pdfa_has_empty_pages_and_multi_page_samples(shards):
    _, stats = read("pdfa", shards["pdfa"], **FAST)
    assert stats["filtered:empty_page"] == 1  # document 5 of 8 ends with a blank page
    samples, _ = read("pdfa", shards["pdfa"], pages_per_sample=2, max_side=100, **FAST)
    assert any(len(s.images) == 2 for s in samples)
    assert all(max(image.size) <= 100 for s in samples for image in s.images)


def test_rendered_text_and_conversations(shards):
    samples, stats = read("rendered_text", shards["rendered_text"])
    assert stats == {"read": N}
    for sample, (_, members) in zip(samples, records(shards["rendered_text"][0])):
        assert sample.content[1] == "\n".join(json.loads(members["json"])["ocr_annotation"]["text"])
        assert is_dark_somewhere(sample.content[0])
    samples, stats = read("cauldron", shards["cauldron"])
    assert stats == {"read": N} and {len(s.images) for s in samples} == {1, 2}
    assert samples[0].meta == {"subset": "clevr", "source": "clevr"} and samples[0].turns[0][0].startswith(
        "How many"
    )
    samples, stats = read("text", shards["text"])
    assert stats == {"read": N} and all(s.content == [] and s.turns for s in samples)
    samples, stats = read("m4_sft", shards["m4_sft"])
    assert stats == {"read": N} and {len(s.images) for s in samples} == {1, 2}


@pytest.mark.parametrize("config", ["data", "pdf"])
def test_docmatix_long_turn_filter(shards, config):
    paths = [p for p in shards["docmatix"] if p.parent.name == config]
    samples, stats = read("docmatix", paths, **FAST)
    assert stats == {"read": N - N // 4, "filtered:long_turn": N // 4}
    assert all(len(s.images) == 1 and s.meta["source"].startswith("PDFA key") for s in samples)
    assert samples[0].turns[0][0] == "What is the first word on the page?"
    _, stats = read("docmatix", paths, max_turn_chars=None, **FAST)
    assert stats == {"read": N}


# -------------------------------------------------------------------------------------- bad records


def truncate_in_last_member(path: Path) -> None:
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    with open(path, "r+b") as file:
        file.truncate(last.offset_data + last.size // 2)


def test_bad_pdf_records_are_counted(shards, tmp_path):
    good = records(shards["pdfa"][0])
    (_, first), (_, second) = good[0], good[1]
    one_more_page = json.loads(first["json"])
    one_more_page["pages"].append(one_more_page["pages"][0])
    bad = [
        ("1000001", {**first, "pdf": b"%PDF-1.7 not really"}),
        ("1000002", {**first, "json": json.dumps(one_more_page).encode()}),
        ("1000003", {**first, "json": b'{"pages": [{'}),
        ("1000004", {"pdf": first["pdf"]}),
        ("1000005", {**first, "json": b'{"pages": [{"no_lines": 1}]}'}),
    ]
    path = write_tar(tmp_path / "pdfa-eng-train-0000.tar", [good[0], *bad, good[1], good[2]])
    truncate_in_last_member(path)
    samples, stats = read("pdfa", [path], **FAST)
    pages = [page_text for members in (first, second) for page_text in json.loads(members["json"])["pages"]]
    assert len(samples) == stats["read"] == sum(bool(p["lines"]["text"]) for p in pages)
    assert stats == {
        "read": stats["read"],
        **{
            "corrupt_pdf": 1,
            "page_count_mismatch": 1,
            "invalid_json": 2,
            "missing_members": 1,
            "truncated_tar": 1,
        },
    }
    idl = records(shards["idl"][0])
    _, members = idl[0]
    path = write_tar(tmp_path / "idl-train-00000.tar", [idl[0], ("zzzz0001", {**members, "tif": b""})])
    n_pages = len(json.loads(members["json"])["pages"])
    assert read("idl", [path], use_tif=True)[1] == {"read": n_pages, "corrupt_image": 1}


def test_bad_rendered_text_and_m4_records(shards, tmp_path):
    good = records(shards["rendered_text"][0])
    _, members = good[0]
    bad = [
        ("a1", {**members, "png": b"\x89PNG\r\n\x1a\n broken"}),
        ("a2", {**members, "json": b"[]"}),
        ("a3", {"json": members["json"]}),
    ]
    path = write_tar(tmp_path / "000000.tar", [good[0], *bad, good[1]])
    assert read("rendered_text", [path])[1] == {
        "read": 2,
        "corrupt_image": 1,
        "invalid_json": 1,
        "missing_members": 1,
    }
    m4 = records(shards["m4_sft"][0])
    _, members = m4[0]
    missing = {k: v for k, v in members.items() if not k.endswith("image.jpeg")}
    broken = {**members, next(k for k in members if k.endswith("text.txt")): b"{not json"}
    path = write_tar(tmp_path / "shard.tar", [m4[0], ("9_x", missing), ("8_y", broken), m4[1]])
    assert read("m4_sft", [path])[1] == {"read": 2, "missing_members": 1, "invalid_json": 1}


def test_bad_parquet_rows_are_counted(shards, tmp_path):
    rows = pq.read_table(shards["cauldron"][0]).to_pylist()
    good = rows[0]
    image = good["images"][0]
    bad = [
        {"images": None, "texts": None},
        {"images": good["images"], "texts": None},
        {"images": good["images"], "texts": [None]},
        {"images": good["images"], "texts": [{"user": None, "assistant": "a", "source": "s"}]},
        {"images": [{**image, "bytes": b"garbage"}], "texts": good["texts"]},
        {"images": [{**image, "bytes": b""}], "texts": good["texts"]},
        {"images": [None], "texts": good["texts"]},
    ]
    path = write_parquet(
        tmp_path / "clevr" / "train.parquet",
        [good, *bad, good],
        CONVERSATION_SCHEMA,
        HF_FEATURES["conversation"],
    )
    samples, stats = read("cauldron", [path])
    assert stats == {"read": 2, "null_row": 5, "corrupt_image": 2}
    assert [s.key.rsplit("#", 1)[1] for s in samples] == ["0", "8"]
    pdf_row = pq.read_table(next(p for p in shards["docmatix"] if p.parent.name == "pdf")).to_pylist()[0]
    path = write_parquet(
        tmp_path / "pdf" / "train.parquet",
        [pdf_row, {**pdf_row, "pdf": b"garbage"}, {**pdf_row, "pdf": None}],
        DOCMATIX_PDF_SCHEMA,
        HF_FEATURES["docmatix_pdf"],
    )
    assert read("docmatix", [path], **FAST)[1] == {"read": 1, "corrupt_pdf": 1, "null_row": 1}


def test_wrong_parquet_schema_is_a_clear_error(tmp_path):
    path = tmp_path / "vqav2" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": [b""], "question": ["q"], "answer": ["a"]}), path)
    with pytest.raises(ValueError, match=r"train\.parquet.*expected columns.*'images'.*found.*'question'"):
        list(iter_samples("cauldron", str(path)))
    pdf_path = tmp_path / "pdf.parquet"
    pq.write_table(pa.table({"pdf": [b""], "texts": [[]]}).cast(DOCMATIX_PDF_SCHEMA), pdf_path)
    with pytest.raises(ValueError, match="unexpected parquet schema"):
        list(iter_samples("cauldron", str(pdf_path)))  # a Docmatix pdf shard is not a Cauldron shard
