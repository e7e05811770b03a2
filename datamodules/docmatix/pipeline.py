"""The pipeline: documents from the PDFA/IDL readers -> prompts -> generations -> filters -> Docmatix
parquet rows, every document and pair counted (``RunSummary``)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path

from tqdm import tqdm

from datamodules.docmatix.filters import FilterConfig, filter_pairs
from datamodules.docmatix.parsing import QAPair, parse_generation
from datamodules.docmatix.prompts import (
    SOURCE_PREFIX,
    SOURCES,
    TEMPLATES,
    Generate,
    PdfDocument,
    build_prompt,
)
from datamodules.sample import Sample
from datamodules.shard_files import HF_FEATURES, ParquetShardWriter, encode_image
from datamodules.sources import RecordStats, iter_samples
from datamodules.sources.conversations import CONVERSATION_SCHEMA


@dataclass(frozen=True)
class DocmatixConfig:
    """Everything a run depends on besides the documents and the generator (the CLI's options)."""

    pairs_per_page: int = 4
    seed: int = 0
    max_docs: int | None = None
    max_pages: int = 4
    min_ocr_chars: int = 20
    max_ocr_chars: int = 8000
    batch_size: int = 1
    filters: FilterConfig = field(default_factory=FilterConfig)
    dpi: float = 150
    max_side: int | None = None
    grayscale: bool = False
    image_format: str = "PNG"
    rows_per_shard: int = 1000
    rows_per_group: int = 100


@dataclass
class RunSummary:
    """Counts of a run: ``documents`` (``read``, ``written``, ``dropped:<reason>``), ``pairs``
    (``parsed``, ``kept``, ``dropped:<reason>``), ``malformed`` output fragments, ``templates``
    (documents prompted per template), the reader's own skips, and the shards written."""

    documents: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    templates: Counter[int] = field(default_factory=Counter)
    reader: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def dropped(self, kind: str) -> dict[str, int]:
        """``{reason: n}`` of the ``documents`` or ``pairs`` drops."""
        counts = getattr(self, kind)
        return {k.removeprefix("dropped:"): v for k, v in sorted(counts.items()) if k.startswith("dropped:")}

    def as_dict(self) -> dict:
        """JSON-ready counts."""
        return {
            "documents": dict(self.documents),
            "pairs": dict(self.pairs),
            "malformed": dict(self.malformed),
            "templates": {str(k): v for k, v in sorted(self.templates.items())},
            "reader": self.reader,
            "shards": self.shards,
        }

    def format(self) -> str:
        """The human-readable summary the CLI prints."""
        docs, pairs = self.documents, self.pairs
        lines = [
            f"documents: {docs['read']} read, {docs['written']} written as rows",
            *(f"  dropped {reason}: {n}" for reason, n in self.dropped("documents").items()),
            f"pairs: {pairs['parsed']} parsed, {pairs['kept']} kept",
            *(f"  dropped {reason}: {n}" for reason, n in self.dropped("pairs").items()),
        ]
        if self.malformed:
            lines.append(
                "unparsed output: " + ", ".join(f"{k} {v}" for k, v in sorted(self.malformed.items()))
            )
        lines.append("templates: " + ", ".join(f"#{k} {v}" for k, v in sorted(self.templates.items())))
        lines.append("reader (pages): " + ", ".join(f"{k} {v}" for k, v in self.reader.items()))
        lines += [f"shard: {path}" for path in self.shards]
        return "\n".join(lines)


def record_key(sample_key: str) -> tuple[str, str]:
    """``(document id, record key)`` of a PDFA/IDL sample key ``"<shard>#<key>/<page>"``."""
    document_id = sample_key.rpartition("/")[0]
    return document_id, document_id.rpartition("#")[2]


def iter_documents(samples: Iterable[Sample], max_pages: int) -> Iterator[PdfDocument]:
    """Group one-page samples back into documents (consecutive samples of the same ``shard#key``),
    keeping at most ``max_pages + 1`` pages in memory per document."""
    current: PdfDocument | None = None
    current_id = None
    for sample in samples:
        document_id, key = record_key(sample.key)
        if document_id != current_id:
            if current is not None:
                yield current
            current, current_id = PdfDocument(source=sample.source, key=key), document_id
        current.n_pages += len(sample.images)
        if current.n_pages <= max_pages + 1:
            current.pages += sample.images
            current.texts += [item for item in sample.content if isinstance(item, str)]
    if current is not None:
        yield current


def docmatix_row(document: PdfDocument, pairs: Sequence[QAPair], image_format: str = "PNG") -> dict:
    """A Docmatix ``images``-config row: page images encoded as ``image_format``, turns with the
    ``"PDFA key: <key>"`` (or ``"IDL key: ..."``) source."""
    source = f"{SOURCE_PREFIX.get(document.source, document.source)}: {document.key}"
    images = [{"bytes": encode_image(page, image_format), "path": None} for page in document.pages]
    return {
        "images": images,
        "texts": [{"user": p.question, "assistant": p.answer, "source": source} for p in pairs],
    }


def _skip_reason(document: PdfDocument, config: DocmatixConfig) -> str | None:
    if document.n_pages > config.max_pages:
        return "too_many_pages"
    if len(document.transcription()) < config.min_ocr_chars:
        return "short_ocr"
    return None


def run_pipeline(
    documents: Iterable[PdfDocument],
    generate: Generate,
    writer: ParquetShardWriter,
    config: DocmatixConfig = DocmatixConfig(),
    progress: bool = True,
) -> RunSummary:
    """Prompt, generate, parse, filter and write every document; returns the counts (shards not closed)."""
    summary = RunSummary()
    rng = random.Random(config.seed)
    seen_in_run: set[tuple[str, str]] = set()
    documents = islice(documents, config.max_docs)
    bar = tqdm(documents, total=config.max_docs, unit="doc", desc="docmatix", disable=not progress)
    batch: list[tuple[PdfDocument, str, int]] = []

    def flush() -> None:
        outputs = generate([prompt for _, prompt, _ in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"generate returned {len(outputs)} outputs for {len(batch)} prompts")
        for (document, _, n_pairs), output in zip(batch, outputs):
            _handle_output(document, output, n_pairs, writer, summary, seen_in_run, config)
        batch.clear()
        bar.set_postfix(rows=summary.documents["written"], kept=summary.pairs["kept"], refresh=False)

    for document in bar:
        summary.documents["read"] += 1
        reason = _skip_reason(document, config)
        if reason is not None:
            summary.documents[f"dropped:{reason}"] += 1
            continue
        template = rng.randrange(len(TEMPLATES))
        summary.templates[template] += 1
        n_pairs = config.pairs_per_page * len(document.pages)
        prompt = build_prompt(document, template, n_pairs, config.max_ocr_chars, config.filters.max_chars)
        batch.append((document, prompt, n_pairs))
        if len(batch) == config.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return summary


def _handle_output(
    document: PdfDocument,
    output: str | None,
    n_pairs: int,
    writer: ParquetShardWriter,
    summary: RunSummary,
    seen_in_run: set[tuple[str, str]],
    config: DocmatixConfig,
) -> None:
    """Parse, filter, count and (if a pair survives) write one document's generation."""
    if output is None:
        summary.documents["dropped:prompt_too_long"] += 1
        return
    parsed = parse_generation(output)
    summary.malformed.update(parsed.malformed)
    if not parsed.complete:
        summary.malformed["no_end"] += 1
    kept, dropped = filter_pairs(parsed, n_pairs, seen_in_run, config.filters)
    summary.pairs["parsed"] += len(parsed.pairs)
    summary.pairs["kept"] += len(kept)
    summary.pairs.update({f"dropped:{reason}": n for reason, n in dropped.items()})
    if not kept:
        summary.documents["dropped:no_pair_kept"] += 1
        return
    writer.add(docmatix_row(document, kept, config.image_format))
    summary.documents["written"] += 1


def prepare_output(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``{out_dir}/data``, created; ``FileExistsError`` if it already holds shards (unless ``overwrite``,
    which deletes them and any leftover ``.part-*`` files of an interrupted run)."""
    folder = Path(out_dir) / "data"
    existing = sorted(folder.glob("train-*.parquet")) + sorted(folder.glob(".part-*.parquet.tmp"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds {len(existing)} shard file(s); use another --out or --overwrite."
        )
    for path in existing:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_documents(
    source: str, urls: str | Sequence[str], config: DocmatixConfig
) -> tuple[Iterator[PdfDocument], RecordStats]:
    """The documents of ``source`` at ``urls`` and the reader's stats; ``ValueError`` for an unknown
    source or when the shards hold no readable document, ``FileNotFoundError`` for missing shards."""
    if source not in SOURCES:
        raise ValueError(f"Unknown document source {source!r}; expected one of {', '.join(SOURCES)}.")
    options = {"dpi": config.dpi, "max_side": config.max_side, "grayscale": config.grayscale}
    stream = iter_samples(source, urls, **options)
    documents = iter_documents(stream, config.max_pages)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"No {source} document found at {urls!r} (reader: {stream.stats.as_dict()}).")
    return chain([first], documents), stream.stats


def generate_docmatix(
    source: str,
    urls: str | Sequence[str],
    generate: Generate,
    out_dir: str | Path,
    config: DocmatixConfig = DocmatixConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run the whole pipeline on the ``source`` (``"pdfa"`` / ``"idl"``) shards at ``urls`` with
    ``generate``, writing ``{out_dir}/data/train-*.parquet`` and ``{out_dir}/generation_summary.json``."""
    folder = prepare_output(out_dir, overwrite)
    documents, stats = read_documents(source, urls, config)
    about = {"source": source, "urls": urls}
    return write_docmatix(documents, stats, generate, folder, config, progress, about)


def write_docmatix(
    documents: Iterable[PdfDocument],
    stats: RecordStats,
    generate: Generate,
    folder: Path,
    config: DocmatixConfig,
    progress: bool = True,
    about: dict | None = None,
) -> RunSummary:
    """``run_pipeline`` into hub-named shards under ``folder`` (``{out}/data``), then
    ``{out}/generation_summary.json`` with ``about``, the configuration and the counts."""
    features = HF_FEATURES["conversation"]
    shards = (config.seed, config.rows_per_shard, config.rows_per_group)
    writer = ParquetShardWriter(folder, CONVERSATION_SCHEMA, features, *shards)
    summary = run_pipeline(documents, generate, writer, config, progress)
    summary.shards = [str(path) for path in writer.close()]
    summary.reader = stats.as_dict()
    record = {**(about or {}), "config": asdict(config), **summary.as_dict()}
    (folder.parent / "generation_summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary
