"""``python -m datamodules.docmatix``: the command line of the pipeline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from datamodules.docmatix.filters import FilterConfig
from datamodules.docmatix.generator import CausalLMGenerator, check_model_folder
from datamodules.docmatix.pipeline import DocmatixConfig, prepare_output, read_documents, write_docmatix
from datamodules.docmatix.prompts import SOURCES


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m datamodules.docmatix`` argument parser."""
    defaults = DocmatixConfig()
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.docmatix", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--source", required=True, choices=SOURCES, help="document dataset format")
    add("--urls", required=True, nargs="+", help="shards: paths, globs, brace patterns, URLs")
    add("--model", required=True, help="local folder of a transformers causal LM (save_pretrained)")
    add("--out", required=True, help="output folder; shards go to OUT/data/train-*.parquet")
    add("--max-docs", type=int, default=None, help="stop after this many documents")
    add("--pairs-per-page", type=int, default=defaults.pairs_per_page, help="pairs asked for per page")
    add("--seed", type=int, default=defaults.seed, help="template choice, sampling, shard names")
    add("--max-pages", type=int, default=defaults.max_pages, help="skip documents with more pages")
    add("--min-ocr-chars", type=int, default=defaults.min_ocr_chars, help="skip shorter transcriptions")
    add("--max-ocr-chars", type=int, default=defaults.max_ocr_chars, help="cut longer transcriptions")
    add("--min-question-chars", type=int, default=defaults.filters.min_question_chars)
    add("--max-chars", type=int, default=defaults.filters.max_chars, help="longest question / answer")
    add("--batch-size", type=int, default=defaults.batch_size, help="prompts per generate call")
    add("--max-new-tokens", type=int, default=1024)
    add("--temperature", type=float, default=0.0, help="0: greedy")
    add("--top-p", type=float, default=1.0)
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    add("--dpi", type=float, default=defaults.dpi, help="page render resolution")
    add("--max-side", type=int, default=None, help="longest page side in pixels")
    add("--grayscale", action="store_true", help="store pages in mode L (default RGB)")
    add("--image-format", default="png", choices=("png", "jpeg"))
    add("--rows-per-shard", type=int, default=defaults.rows_per_shard)
    add("--rows-per-group", type=int, default=defaults.rows_per_group)
    add("--overwrite", action="store_true", help="replace shards already in OUT/data")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> DocmatixConfig:
    """The ``DocmatixConfig`` of parsed CLI arguments (positive sizes checked)."""
    for name in (
        "pairs_per_page",
        "max_pages",
        "batch_size",
        "max_new_tokens",
        "rows_per_shard",
        "rows_per_group",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    filters = FilterConfig(min_question_chars=args.min_question_chars, max_chars=args.max_chars)
    return DocmatixConfig(
        pairs_per_page=args.pairs_per_page,
        seed=args.seed,
        max_docs=args.max_docs,
        max_pages=args.max_pages,
        min_ocr_chars=args.min_ocr_chars,
        max_ocr_chars=args.max_ocr_chars,
        batch_size=args.batch_size,
        filters=filters,
        dpi=args.dpi,
        max_side=args.max_side,
        grayscale=args.grayscale,
        image_format=args.image_format.upper(),
        rows_per_shard=args.rows_per_shard,
        rows_per_group=args.rows_per_group,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate, write, print the summary. Bad input exits with ``error: <message>``."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_model_folder(args.model)
        folder = prepare_output(args.out, args.overwrite)  # bad input fails before the model loads
        documents, stats = read_documents(args.source, args.urls, config)
        generator = CausalLMGenerator(
            args.model, args.max_new_tokens, args.temperature, args.top_p, args.device, args.dtype, args.seed
        )
        about = {"source": args.source, "urls": args.urls, "model": str(args.model)}
        summary = write_docmatix(documents, stats, generator, folder, config, not args.no_progress, about)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0
