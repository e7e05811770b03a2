"""Configuration of a VisionLanguageModel: one dataclass per component plus named presets.

The presets reproduce the released architectures: ``idefics2`` (Idefics2 paper, section 3 and
appendix A.2) and ``idefics3`` (Idefics3 report). The ``-tiny`` twins keep every structural choice
and shrink only the sizes, so they build in milliseconds on a CPU for tests and demos.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

#: How visual tokens reach the language model (``VLMConfig.fusion``).
Fusion = Literal["autoregressive", "cross_attention"]
#: A model family's image splitting and prompt layout (``ImageProcessor``, ``VLMProcessor``).
Recipe = Literal["idefics2", "idefics3"]

# Special tokens of both recipes, in the order the released tokenizers added them (so that the
# ids appended to a base vocabulary match the released checkpoints: Idefics2 image token 32001,
# Idefics3 image token 128257).
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
RECIPE_SPECIAL_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)

# Label value of positions that take no loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


@dataclass
class VisionConfig:
    """Vision tower: which ViT implementation, its sizes, and how positions and padding are handled.

    ``backend``: ``siglip`` (transformers' SigLIP vision transformer, the Idefics tower),
    ``timm`` or ``open_clip`` (``model_name`` names the architecture), or a name registered with
    ``vlm.vision.register_vision_backend``. ``image_size`` is the side
    of the square the position-embedding grid was trained on; inputs of any size that is a
    multiple of ``patch_size`` are accepted. ``position_embedding``: ``bucketed`` maps each patch's
    fractional coordinates to the nearest grid cell (NaViT / Idefics2); ``interpolated`` resizes
    the grid bicubically (timm). ``patch_mask_rule``: a patch of a padded image is attended to if
    ``all`` its pixels are real (Idefics2) or ``any`` is (Idefics3). ``max_size_groups``: where
    padding cannot change the visual tokens (``bucketed`` positions with a connector that ignores
    padding, such as the perceiver) and the tower's attention cannot pack the images,
    padded images are encoded on their own patch extent in at most this many tower calls per batch
    (images of different extents merge, padded to the larger, beyond it; each call re-gathers the
    tower's weights under FSDP); 1 encodes the whole padded canvas in one call.
    ``attn_implementation``: the tower's attention (``vlm.attention.CHOICES``; ``auto``: the fastest
    available on a GPU, sdpa on CPU); timm and open_clip towers run sdpa only.
    """

    backend: str = "siglip"
    model_name: str | None = None
    image_size: int = 980
    patch_size: int = 14
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    position_embedding: Literal["bucketed", "interpolated"] = "bucketed"
    patch_mask_rule: Literal["all", "any"] = "all"
    max_size_groups: int = 8
    pretrained: str | None = None
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.max_size_groups < 1:
            raise ValueError(
                f"vision.max_size_groups must be >= 1 (got {self.max_size_groups}); "
                "1 encodes the padded canvas in one call."
            )


@dataclass
class ConnectorConfig:
    """Connector from vision features to language-model embeddings (Idefics2 paper, Tables 11-13).

    ``type``:
      - ``linear``: one linear projection per patch token.
      - ``mlp``: gated 2-layer MLP (SwiGLU, the Idefics2 modality projection) per patch token.
      - ``mapping_network``: MAPL-style (Mañas et al., 2023) transformer over the projected patches
        plus ``num_latents`` learned queries; the queries' outputs are the visual tokens.
      - ``perceiver``: optional MLP (``mlp_before``, Table 13) then a perceiver resampler of
        ``depth`` layers and ``num_latents`` latents (Idefics2: MLP then 3 x 64).
      - ``pixel_shuffle``: space-to-depth by ``scale_factor`` then a linear projection
        (Idefics3: scale 2, 169 tokens per 364x364 tile).
      - a name registered with ``vlm.connectors.register_connector``.
    ``mlp_intermediate_size`` defaults to the language model's intermediate size (as Idefics2).
    """

    type: str = "perceiver"
    mlp_before: bool = True
    mlp_intermediate_size: int | None = None
    mlp_act: str = "silu"
    num_latents: int = 64
    depth: int = 3
    num_heads: int = 16
    head_dim: int = 96
    num_key_value_heads: int = 4
    perceiver_act: str = "silu"
    rms_norm_eps: float = 1e-6
    scale_factor: int = 2
    mapping_hidden_size: int = 512


@dataclass
class LanguageConfig:
    """Causal language model: built from a transformers config or loaded from a local path/hub name.

    With ``pretrained`` unset, the model is built from ``AutoConfig.for_model(model_type,
    **config)`` with random weights; ``pretrained`` (a local folder, ``~`` and ``${VAR}`` expanded,
    or a hub name) loads a saved model instead (``model_type`` and ``config`` are then unused).
    ``special_tokens`` missing from the vocabulary are added (to the tokenizer when there is one,
    else appended after ``config['vocab_size']``) and the embeddings resized to match.
    ``attn_implementation``: ``vlm.attention.CHOICES`` (``auto``: the fastest available on a GPU, sdpa
    on CPU).
    """

    model_type: str = "mistral"
    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    special_tokens: list[str] = field(default_factory=lambda: list(RECIPE_SPECIAL_TOKENS))
    attn_implementation: str = "auto"


@dataclass
class CrossAttentionConfig:
    """Flamingo-style gated cross-attention (Idefics2 paper, section 3.2, Table 3).

    A block is inserted before decoder layer ``i`` when ``(i + 1) % every_n_layers == 0`` (as in
    open_flamingo). ``only_attend_immediate_media``: a text token attends to the last image
    before it only (Flamingo), or to all images before it.
    """

    every_n_layers: int = 4
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    only_attend_immediate_media: bool = True


@dataclass
class VLMConfig:
    """A whole VisionLanguageModel: components, fusion strategy and the image-token id.

    ``fusion``: ``autoregressive`` puts the visual tokens in the language model's sequence at the
    ``<image>`` positions; ``cross_attention`` keeps one ``<image>`` marker per image and lets
    text attend to the visual tokens through gated cross-attention blocks.
    ``image_token_id`` is resolved from the language model's special tokens when left unset.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: Fusion = "autoregressive"
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    image_token_id: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        """The config ``dataclasses.asdict`` turned into ``data`` (e.g. read back from JSON)."""
        parts = {
            "vision": VisionConfig,
            "connector": ConnectorConfig,
            "language": LanguageConfig,
            "cross_attention": CrossAttentionConfig,
        }
        return cls(**{key: parts[key](**value) if key in parts else value for key, value in data.items()})


# --- real-scale backbones -------------------------------------------------------------------

# SigLIP-SO400M/14 (Idefics2 paper, section 3.1 and Table 2).
SIGLIP_SO400M = dict(patch_size=14, hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304)

# Mistral-7B-v0.1 (Idefics2 backbone, paper section 3.1 / Table 1).
MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    hidden_act="silu",
    tie_word_embeddings=False,
)

# Llama-3.1-8B (Idefics3 backbone).
LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)

TINY_VISION = dict(patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
TINY_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Tiny LMs have 2 layers: a block before each, so switching fusion to cross_attention works as is.
TINY_CROSS_ATTENTION = partial(CrossAttentionConfig, every_n_layers=1, heads=4, dim_head=16)


def _idefics2() -> VLMConfig:
    """Idefics2-8B: SigLIP-SO400M at up to 980px (bucketed positions), Mistral-7B, MLP + perceiver 3x64."""
    return VLMConfig(
        vision=VisionConfig(image_size=980, patch_mask_rule="all", **SIGLIP_SO400M),
        connector=ConnectorConfig(type="perceiver", num_latents=64, depth=3, num_heads=16, head_dim=96),
        language=LanguageConfig(model_type="mistral", config=dict(MISTRAL_7B)),
    )


def _idefics3() -> VLMConfig:
    """Idefics3-8B: SigLIP-SO400M on 364px tiles, Llama-3.1-8B, pixel shuffle 2 + linear."""
    return VLMConfig(
        vision=VisionConfig(image_size=364, patch_mask_rule="any", **SIGLIP_SO400M),
        connector=ConnectorConfig(type="pixel_shuffle", scale_factor=2),
        language=LanguageConfig(model_type="llama", config=copy.deepcopy(LLAMA31_8B)),
    )


def _idefics2_tiny() -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(image_size=32, patch_mask_rule="all", **TINY_VISION),
        connector=ConnectorConfig(
            type="perceiver", num_latents=8, depth=2, num_heads=4, head_dim=16, num_key_value_heads=2
        ),
        language=LanguageConfig(model_type="mistral", config=dict(TINY_TEXT)),
        cross_attention=TINY_CROSS_ATTENTION(),
    )


def _idefics3_tiny() -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(image_size=32, patch_mask_rule="any", **TINY_VISION),
        connector=ConnectorConfig(type="pixel_shuffle", scale_factor=2),
        language=LanguageConfig(model_type="llama", config=dict(TINY_TEXT)),
        cross_attention=TINY_CROSS_ATTENTION(),
    )


PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "idefics2": _idefics2,
    "idefics3": _idefics3,
    "idefics2-tiny": _idefics2_tiny,
    "idefics3-tiny": _idefics3_tiny,
}


def get_preset(name: str) -> VLMConfig:
    """Return a fresh copy of the named preset configuration (see ``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"Unknown model preset {name!r}; available presets: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]()
