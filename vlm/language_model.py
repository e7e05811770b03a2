"""Language model: any transformers causal LM, with the recipe's special tokens in its vocabulary."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm.attention import resolve_attention
from vlm.config import LanguageConfig


@dataclass
class TextDims:
    """Widths of a causal LM that the connector and fusion need, read from any transformers config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int


def text_dims(config: PretrainedConfig) -> TextDims:
    """Read hidden / intermediate sizes and depth from Llama-, Mistral-, Qwen2- or GPT-2-style configs."""
    config = config.get_text_config()
    hidden = config.hidden_size
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    return TextDims(hidden, intermediate, config.num_hidden_layers)


def language_config_of(config: PretrainedConfig) -> LanguageConfig:
    """A ``LanguageConfig`` that builds a model of ``config``'s architecture and sizes (random weights,
    no special tokens added: ``config``'s vocabulary already holds them)."""
    values = config.to_dict()
    model_type = values.pop("model_type")
    return LanguageConfig(model_type=model_type, config=values, special_tokens=[])


def resolve_path(path: str | Path) -> str:
    """``path`` with ``~`` and ``${VAR}`` expanded (YAML configs cannot expand them); hub names unchanged."""
    return os.path.expanduser(os.path.expandvars(str(path)))


#: ``load_tokenizer``'s name of the tiny offline tokenizer (``vlm/assets``) of the tests, demo and tiny twins.
TINY_TOKENIZER = "tiny"


def load_tokenizer(name: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer called ``name`` in configs: ``"tiny"`` (``TINY_TOKENIZER``, shipped, offline), or the
    one saved beside a language model (local directory, ``~`` and ``${VAR}`` expanded, or hub name)."""
    if str(name) == TINY_TOKENIZER:
        # Imported here: vlm.processing imports this module.
        from vlm.processing.tokenizer import load_tiny_tokenizer

        return load_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_path(name))


def build_language_model(
    cfg: LanguageConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedModel, dict[str, int]]:
    """Build or load the causal LM and return it with the ids of ``cfg.special_tokens``.

    Missing special tokens are added to ``tokenizer`` (then the embeddings are resized with
    transformers' mean-preserving initialisation); without a tokenizer they get the ids right
    after the configured vocabulary, which is how the released Idefics vocabularies were made.
    """
    attention = resolve_attention(cfg.attn_implementation, "language.attn_implementation")
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(cfg.pretrained), attn_implementation=attention
        )
    else:
        try:
            config = AutoConfig.for_model(cfg.model_type, **cfg.config)
        except ValueError as err:
            raise ValueError(
                f"language.model_type={cfg.model_type!r} is not a transformers model type ({err}); "
                "use e.g. 'llama', 'mistral', 'qwen2' or 'gpt2', or set language.pretrained to a model path."
            ) from err
        if tokenizer is None and cfg.special_tokens:
            base_vocab = config.get_text_config().vocab_size
            config.get_text_config().vocab_size = base_vocab + len(cfg.special_tokens)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
            return model, {tok: base_vocab + i for i, tok in enumerate(cfg.special_tokens)}
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)

    if tokenizer is None:
        if cfg.special_tokens:
            raise ValueError(
                "A pretrained language model needs its tokenizer to place language.special_tokens: pass "
                "tokenizer=load_tokenizer(language.pretrained), or set language.special_tokens to [] if the "
                "vocabulary already holds them and give image_token_id explicitly."
            )
        return model, {}
    token_ids = add_special_tokens(tokenizer, cfg.special_tokens)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model, token_ids


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> dict[str, int]:
    """Add the ``tokens`` the tokenizer lacks as special tokens (never split); return every token's id."""
    missing = [tok for tok in tokens if tok not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokens}
