"""The Docmatix-style pipeline (``datamodules.docmatix``) end to end on miniature PDFA/IDL shards with a
scripted generator (kept pairs, images and texts read back with the Docmatix reader), and the CLI with a
tiny random causal LM (parsing and filters: tests/test_docmatix.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from datamodules.docmatix import (
    CausalLMGenerator,
    DocmatixConfig,
    PdfDocument,
    generate_docmatix,
    iter_documents,
    main,
    run_pipeline,
)
from datamodules.sample import Sample
from datamodules.shard_files import write_tar
from datamodules.sources import iter_samples
from datamodules.sources.conversations import CONVERSATION_SCHEMA
from datamodules.synthetic import write_shards
from vlm.processing import load_tiny_tokenizer

FAST = {"dpi": 72}  # small renders keep the test fast
HUB_NAME = re.compile(r"train-\d{5}-of-\d{5}-[0-9a-f]{16}\.parquet")

# -------------------------------------------------------------------------------- end to end, scripted


class ScriptedGenerator:
    """Answers each prompt with well-formed pairs about its transcription and crafted bad ones, and
    records which pairs the pipeline must keep (by the rules, not by calling the filters)."""

    def __init__(self) -> None:
        self.calls = 0
        self.expected: dict[str, list[tuple[str, str]]] = {}  # transcription -> kept pairs
        self.drops: Counter[str] = Counter()
        self.batches: list[int] = []
        self.kept_in_run: set[tuple[str, str]] = set()

    def __call__(self, prompts: list[str]) -> list[str | None]:
        self.batches.append(len(prompts))
        return [self._one(prompt) for prompt in prompts]

    def _one(self, prompt: str) -> str:
        index, self.calls = self.calls, self.calls + 1
        text = prompt.split("<document>\n", 1)[1].split("\n</document>", 1)[0]
        words = [
            w for line in text.splitlines() if not re.fullmatch(r"Page \d+:", line) for w in line.split()
        ]
        good = [("What is the first word of the document?", words[0])]
        good.append(("What is the last word of the document?", words[-1]))
        common = ("Which collection is this document from?", "The synthetic collection.")
        lines = ["Here are the pairs:"]  # preamble: counted, not a pair
        if index % 4 == 3:  # only bad pairs: no row for this document
            bad = [
                ("Who is the author?", "Not mentioned in the document."),
                ("Summarize the document.", "Words."),
            ]
            self.drops.update(["unanswerable", "no_question_mark"])
            self.expected[text] = []
            for q, a in bad:
                lines += [f"Q: {q}", f"A: {a}"]
            return "\n".join([*lines, "END"])
        pairs = [
            good[0],
            ("Who is the author?", "I don't know."),
            ("What is the first word of the document?", "again"),
            good[1],
            ("Summarize the document.", "Random words."),
            common,
        ]
        self.drops.update(["unanswerable", "duplicate_in_document", "no_question_mark"])
        kept = []
        for pair in [*good, common]:  # the common pair, or a last word seen before, repeats an earlier pair
            if pair in self.kept_in_run:
                self.drops["duplicate_in_run"] += 1
            else:
                kept.append(pair)
        self.kept_in_run.update(kept)
        truncated = index % 4 == 1
        if truncated:
            pairs.append(("What is the second word of the document?", words[min(1, len(words) - 1)]))
            self.drops["truncated"] += 1
        for q, a in pairs:
            lines += [f"Q: {q}", f"A: {a}"]
        self.expected[text] = kept
        return "\n".join(lines if truncated else [*lines, "END"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return {
        "pdfa": write_shards("pdfa", root / "pdfa", 6, seed=4),
        "idl": write_shards("idl", root / "idl", 3, seed=5),
    }


def _transcription(texts: list[str]) -> str:
    return texts[0] if len(texts) == 1 else "\n\n".join(f"Page {i + 1}:\n{t}" for i, t in enumerate(texts))


def _reference_documents(source: str, paths: list[Path]) -> dict[str, list]:
    """key -> (page images, OCR texts) straight from the reader, whole documents per sample."""
    samples = iter_samples(source, [str(p) for p in paths], pages_per_sample=100, grayscale=False, **FAST)
    return {
        s.key.split("#")[1].split("/")[0]: (s.images, [c for c in s.content if isinstance(c, str)])
        for s in samples
    }


def test_pipeline_keeps_exactly_the_well_formed_pairs(shards, tmp_path):
    generator = ScriptedGenerator()
    config = DocmatixConfig(min_ocr_chars=0, batch_size=4, rows_per_shard=2, rows_per_group=1, **FAST)
    urls = str(shards["pdfa"][0].parent / "pdfa-eng-train-*.tar")
    summary = generate_docmatix("pdfa", urls, generator, tmp_path / "out", config, progress=False)

    assert generator.batches == [4, 2]  # 6 documents in batches of 4
    assert summary.documents == {"read": 6, "written": 5, "dropped:no_pair_kept": 1}
    kept = sum(len(pairs) for pairs in generator.expected.values())
    assert (
        summary.pairs["kept"] == kept == 10
    )  # 2 per written document + the common pair - a repeated last word
    assert summary.dropped("pairs") == dict(generator.drops)
    assert summary.pairs["parsed"] == kept + sum(generator.drops.values())
    assert summary.malformed == {"preamble": 6, "no_end": 2}
    assert sum(summary.templates.values()) == 6 and set(summary.templates) <= set(range(5))

    # hub layout: 5 rows in shards of 2 -> 3 files, exact schema and features metadata, no part files left
    folder = tmp_path / "out" / "data"
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in summary.shards)
    assert len(summary.shards) == 3 and all(HUB_NAME.fullmatch(Path(p).name) for p in summary.shards)
    assert all("-of-00003-" in p for p in summary.shards)
    for path in summary.shards:
        schema = pq.read_schema(path)
        assert schema.remove_metadata().equals(CONVERSATION_SCHEMA)
        assert (
            json.loads(schema.metadata[b"huggingface"])["info"]["features"]["images"]["_type"] == "Sequence"
        )

    # read back with the Docmatix reader: the pages and OCR of the source documents, the expected pairs
    reference = _reference_documents("pdfa", shards["pdfa"])
    rows = list(iter_samples("docmatix", summary.shards))
    assert len(rows) == 5
    for row in rows:
        prefix, key = row.meta["source"].split(": ")
        assert prefix == "PDFA key"
        pages, texts = reference[key]
        assert row.turns == generator.expected[_transcription(texts)]
        assert len(row.images) == len(pages)
        for stored, page in zip(row.images, pages):
            assert stored.size == page.size and stored.convert("RGB").tobytes() == page.tobytes()
    written = {r.meta["source"].split(": ")[1] for r in rows}
    skipped = [_transcription(texts) for key, (_, texts) in reference.items() if key not in written]
    assert skipped == [text for text, pairs in generator.expected.items() if not pairs]
    summary_file = json.loads((tmp_path / "out" / "generation_summary.json").read_text())
    assert summary_file["pairs"]["kept"] == 10 and summary_file["config"]["batch_size"] == 4


def test_pipeline_idl_with_jpeg_pages(shards, tmp_path):
    generator = ScriptedGenerator()
    config = DocmatixConfig(min_ocr_chars=0, image_format="JPEG", **FAST)
    summary = generate_docmatix(
        "idl", [str(p) for p in shards["idl"]], generator, tmp_path, config, progress=False
    )
    assert summary.documents == {"read": 3, "written": 3}
    reference = _reference_documents("idl", shards["idl"])
    table = pq.read_table(summary.shards[0]).to_pylist()
    assert all(image["bytes"][:2] == b"\xff\xd8" for row in table for image in row["images"])  # JPEG
    rows = list(iter_samples("docmatix", summary.shards))
    for row in rows:
        prefix, key = row.meta["source"].split(": ")
        assert prefix == "IDL key" and [im.size for im in row.images] == [p.size for p in reference[key][0]]
    assert sum(len(r.turns) for r in rows) == summary.pairs["kept"] == 7


def test_pages_are_grouped_back_into_documents():
    page = Image.new("L", (4, 4))
    samples = [Sample("idl", f"s.tar#ab12/{i}", [page, f"line {i}"]) for i in (0, 1, 3)]
    samples.append(Sample("idl", "s.tar#cd34/0", [page, "other"]))
    long, short = iter_documents(samples, max_pages=1)
    assert (long.key, long.n_pages, long.texts, len(long.pages)) == ("ab12", 3, ["line 0", "line 1"], 2)
    assert (short.source, short.key, short.n_pages, short.texts) == ("idl", "cd34", 1, ["other"])


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)


def test_document_selection_and_prompts_that_do_not_fit():
    page = Image.new("L", (4, 4))
    documents = [
        PdfDocument("pdfa", "1", pages=[page] * 5, texts=["a b c"] * 5, n_pages=5),  # too many pages
        PdfDocument("pdfa", "2", pages=[page], texts=["short"], n_pages=1),  # under min_ocr_chars
        PdfDocument(
            "pdfa", "3", pages=[page], texts=["long enough text here"], n_pages=1
        ),  # generate -> None
    ]
    prompts: list[str] = []

    def generate(batch: list[str]) -> list[str | None]:
        prompts.extend(batch)
        return [None] * len(batch)

    config = DocmatixConfig(min_ocr_chars=10, max_pages=4, pairs_per_page=3)
    summary = run_pipeline(documents, generate, _Rows(), config, progress=False)
    assert summary.documents == {
        "read": 3,
        "dropped:too_many_pages": 1,
        "dropped:short_ocr": 1,
        "dropped:prompt_too_long": 1,
    }
    assert len(prompts) == 1 and "Write 3 " in prompts[0]  # pairs_per_page x pages
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        run_pipeline(
            documents[2:] * 2, lambda b: ["END"], _Rows(), DocmatixConfig(batch_size=2), progress=False
        )


# ------------------------------------------------------------------------------ tiny model and the CLI


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_runs_end_to_end_with_a_tiny_random_model(shards, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    urls = str(shards["pdfa"][0].parent / "pdfa-eng-train-{0000..0000}.tar")
    args = ["--source", "pdfa", "--urls", urls, "--model", str(tiny_model), "--out", str(out)]
    args += [
        "--max-docs",
        "3",
        "--max-new-tokens",
        "12",
        "--dpi",
        "72",
        "--min-ocr-chars",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "documents: 3 read" in printed and "pairs:" in printed
    record = json.loads((out / "generation_summary.json").read_text())
    docs, pairs = record["documents"], record["pairs"]
    assert (
        docs["read"]
        == 3
        == docs.get("written", 0) + sum(v for k, v in docs.items() if k.startswith("dropped:"))
    )
    assert pairs.get("parsed", 0) == pairs.get("kept", 0) + sum(
        v for k, v in pairs.items() if k.startswith("dropped:")
    )
    assert sum(record["templates"].values()) == 3 - docs.get("dropped:too_many_pages", 0)
    rows = list(iter_samples("docmatix", record["shards"]))  # an empty shard when nothing was kept
    assert len(rows) == docs.get("written", 0)
    assert main(args) == 2  # the output now holds shards
    assert "already holds 1 shard file(s)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_generator_uses_the_chat_template_when_there_is_one(tiny_model):
    generator = CausalLMGenerator(tiny_model, max_new_tokens=4)
    assert generator.format_prompt("Hi") == "Hi\n\n"  # the tiny tokenizer has no chat template
    generator.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert generator.format_prompt("Hi") == "<|user|>Hi\n<|assistant|>"
    outputs = generator(["Hi there", "word " * 2100])  # the second does not fit the 2048 positions
    assert isinstance(outputs[0], str) and outputs[1] is None


def test_bad_input_is_reported_clearly(shards, tiny_model, tmp_path, capsys):
    urls = [str(p) for p in shards["pdfa"]]
    base = ["--source", "pdfa", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*base, "--urls", *urls, "--model", str(tmp_path / "missing")]) == 2
    assert "Model folder not found" in capsys.readouterr().err
    (tmp_path / "empty-model").mkdir()
    assert main([*base, "--urls", *urls, "--model", str(tmp_path / "empty-model")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main([*base, "--urls", str(tmp_path / "nothing-*.tar"), "--model", str(tiny_model)]) == 2
    assert "No shard matches" in capsys.readouterr().err
    empty = write_tar(tmp_path / "pdfa-eng-train-0000.tar", [])
    assert main([*base, "--urls", str(empty), "--model", str(tiny_model)]) == 2
    assert "No pdfa document found" in capsys.readouterr().err
    assert main([*base, "--urls", *urls, "--model", str(tiny_model), "--pairs-per-page", "0"]) == 2
    assert "--pairs-per-page must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--urls", *urls, "--model", str(tiny_model), "--source", "obelics"])
    with pytest.raises(ValueError, match="Unknown document source"):
        generate_docmatix("cauldron", urls, lambda b: [], tmp_path / "o2")
    assert not (tmp_path / "out" / "data").exists() or not any((tmp_path / "out" / "data").iterdir())
