"""Talk to a trained model in the terminal:
``python -m runners.chat --ckpt_path run.ckpt --image a.png "What?"``.

The model is a training checkpoint (``--ckpt_path``, with ``--config`` as ``runners.export``) or an
exported folder (``--model_dir``, read by ``vlm.hf.load_model_dir``: transformers Idefics2/Idefics3 or
this project's ``save_pretrained`` format).
Questions come from the command line, then from standard input, one per line, until end of input
(on a terminal, with a prompt; from a pipe or file, only when no question was given). The
conversation is kept across turns: each question is asked after the earlier questions and answers.
``--image`` paths go with the first question; in the input, a line ``/image <path>`` adds an image
to the next question. Answers are decoded as in prediction (``vlm.generation.generate_answers``):
greedy unless ``--do_sample``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from PIL import Image

from runners.export import load_checkpoint
from vlm.generation import GenerationSettings, generate_answers
from vlm.hf import load_model_dir
from vlm.model import VisionLanguageModel
from vlm.processing import VLMProcessor, load_image
from vlm.processing.processor import GENERATION_INPUTS

IMAGE_COMMAND = "/image "


class Chat:
    """A conversation with ``model``: ``ask`` answers a question (with images, if any) after the
    earlier turns."""

    def __init__(
        self,
        model: VisionLanguageModel,
        processor: VLMProcessor,
        settings: GenerationSettings | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.processor = model.eval(), processor
        self.settings = settings or GenerationSettings()
        self.generator = generator
        self.messages: list[dict[str, Any]] = []
        self.images: list[Image.Image] = []

    def ask(self, question: str, images: Iterable[str | os.PathLike | Image.Image] = ()) -> str:
        """The answer to ``question`` about ``images`` (paths or PIL images; they precede the question)."""
        new_images = [load_image(image) for image in images]
        content = [{"type": "image"} for _ in new_images] + [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        self.images += new_images
        encoded = self.processor.encode_conversations(
            [self.messages],
            [self.images] if self.images else None,
            add_generation_prompt=True,
            padding_side="left",
        )
        device = next(self.model.parameters()).device
        inputs = {key: encoded[key].to(device) for key in GENERATION_INPUTS if key in encoded}
        tokenizer = self.processor.tokenizer
        answer = generate_answers(self.model, tokenizer, inputs, self.settings, self.generator)[0].strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def _questions(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """(question, image paths) pairs: the command line's, then standard input's lines (after command
    line questions only from a terminal, so that a script asking one question does not wait)."""
    images = list(args.image)
    for question in args.question:
        yield question, images
        images = []
    interactive = sys.stdin.isatty()
    if args.question and not interactive:
        return
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(IMAGE_COMMAND):
            images.append(line[len(IMAGE_COMMAND) :].strip())
        elif line:
            yield line, images
            images = []


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m runners.chat", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="Lightning checkpoint of a VLMModule")
    source.add_argument("--model_dir", help="folder written by python -m runners.export")
    parser.add_argument("--config", help="training YAML, for a checkpoint without its data settings")
    parser.add_argument("--image", action="append", default=[], help="image path for the first question")
    parser.add_argument("question", nargs="*", help="questions (default: read from standard input)")
    parser.add_argument("--max_new_tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=GenerationSettings.temperature)
    parser.add_argument("--top_k", type=int, default=GenerationSettings.top_k)
    parser.add_argument("--top_p", type=float, default=GenerationSettings.top_p)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.config and not args.ckpt_path:
        parser.error("--config goes with --ckpt_path (an exported --model_dir holds its settings).")
    if args.ckpt_path:
        module, processor = load_checkpoint(args.ckpt_path, args.config)
        model = module.model
    else:
        model, processor = load_model_dir(args.model_dir)
    settings = GenerationSettings(
        args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p, args.stop
    )
    chat = Chat(
        model.to(args.device), processor, settings, torch.Generator(args.device).manual_seed(args.seed)
    )
    for question, images in _questions(args):
        print(chat.ask(question, images), flush=True)


if __name__ == "__main__":
    main()
