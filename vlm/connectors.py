"""Connectors: map vision-tower patch tokens to visual tokens in the language model's embedding space.

Every connector takes ``features`` (n_images, n_patches, vision_dim), the patch ``grid`` (h, w)
and an optional ``patch_mask`` (n_images, n_patches; False for padding) and returns
(n_images, n_tokens, text_dim). Module names follow transformers' Idefics2/Idefics3 connectors
(``modality_projection``, ``perceiver_resampler``) so checkpoints map by prefix only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from vlm.config import ConnectorConfig, VLMConfig


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 (as Llama/Idefics2), so bf16 training matches the release."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU-style MLP ``down(act(gate(x)) * up(x))``: the Idefics2 modality projection and perceiver MLP."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, out_dim, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LinearProjection(nn.Module):
    """One bias-free linear map per token (the Idefics3 ``modality_projection``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Connector(nn.Module):
    """Base class: ``forward(features, grid, patch_mask) -> visual tokens``.

    A connector declares what the training code needs to know about it: its repeated blocks (FSDP2 and
    activation-checkpointing units), its parameters that take no weight decay, whether its output
    ignores padded patches (``ignores_padding``: then the tower may leave them out, packed or cropped),
    and how many visual tokens a tile's patch grid becomes (``tokens_per_tile``: the processor's
    ``image_seq_len``, see ``visual_tokens_per_tile``).
    """

    ignores_padding: bool = False

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def repeated_blocks(self) -> list[nn.Module]:
        """The connector's repeated layers, in order (none for a per-patch projection)."""
        raise NotImplementedError(f"{type(self).__name__} must declare its repeated_blocks().")

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the connector) of parameters that take no weight decay, besides the 1-D
        ones, which never do: learned queries / latents."""
        return set()

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        """The number of visual tokens ``forward`` makes of one tile (or image) of ``grid`` (h, w) patches."""
        raise NotImplementedError(f"{type(self).__name__} must declare its tokens_per_tile(grid).")


class ProjectionConnector(Connector):
    """Per-patch projection (``linear`` or gated ``mlp``): as many visual tokens as patches."""

    def __init__(self, modality_projection: nn.Module) -> None:
        super().__init__()
        self.modality_projection = modality_projection

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        return self.modality_projection(features)

    def repeated_blocks(self) -> list[nn.Module]:
        return []

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]


class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] with grouped-query attention (Idefics2 perceiver)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, latents: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        b, n, _ = latents.shape
        kv_input = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_input).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_input).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class PerceiverLayer(nn.Module):
    """Pre-norm perceiver block: RMSNorm'd cross-attention then a gated MLP, both residual."""

    def __init__(self, dim: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.input_latents_norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.input_context_norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.self_attn = PerceiverAttention(dim, cfg.num_heads, cfg.head_dim, cfg.num_key_value_heads)
        self.post_attention_layernorm = RMSNorm(dim, cfg.rms_norm_eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim, cfg.perceiver_act)

    def forward(self, latents: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        context = self.input_context_norm(context)
        latents = latents + self.self_attn(self.input_latents_norm(latents), context, key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Learned pooling of any number of patches into ``num_latents`` tokens (Idefics2 paper, 3.3)."""

    def __init__(self, dim: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        # Distinct random latents (as open_flamingo / Idefics1): transformers' Idefics2 fills them with
        # ones, which is harmless when loading trained weights but makes every latent start identical, so
        # a perceiver trained from scratch pools like one query for hundreds of steps (the CPU demo).
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)

    def forward(self, context: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        latents = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        key_mask = None
        if patch_mask is not None:
            key_mask = torch.cat(
                [patch_mask.bool(), patch_mask.new_ones(latents.shape[:2], dtype=torch.bool)], 1
            )
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


class PerceiverConnector(Connector):
    """Optional gated-MLP modality projection followed by a perceiver resampler (Idefics2)."""

    def __init__(self, vision_dim: int, text_dim: int, mlp_hidden: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        if cfg.mlp_before:
            self.modality_projection = GatedMLP(vision_dim, mlp_hidden, text_dim, cfg.mlp_act)
        else:
            self.modality_projection = LinearProjection(vision_dim, text_dim)
        self.perceiver_resampler = PerceiverResampler(text_dim, cfg)

    ignores_padding = True

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        return self.perceiver_resampler(self.modality_projection(features), patch_mask)

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.perceiver_resampler.layers)

    def no_weight_decay(self) -> set[str]:
        return {"perceiver_resampler.latents"}

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        return self.perceiver_resampler.latents.shape[0]


def shuffled_tokens(grid: tuple[int, int], scale: int) -> int:
    """Tokens of a (h, w) patch grid after a pixel shuffle by ``scale``; the grid must divide by it."""
    h, w = grid
    if h % scale or w % scale:
        raise ValueError(
            f"pixel_shuffle needs a patch grid divisible by connector.scale_factor={scale}; got grid "
            f"{h}x{w}. Use image/tile sides that are multiples of patch_size * scale_factor."
        )
    return h * w // scale**2


def pixel_shuffle(features: Tensor, grid: tuple[int, int], scale: int) -> Tensor:
    """Space-to-depth: (n, h*w, d) -> (n, h*w/scale^2, d*scale^2), in transformers' Idefics3 order."""
    n, seq, dim = features.shape
    h, w = grid
    if h * w != seq:
        raise ValueError(f"pixel_shuffle got grid {h}x{w} for {seq} patches.")
    shuffled_tokens(grid, scale)
    x = features.view(n, h, w // scale, dim * scale).permute(0, 2, 1, 3)
    x = x.reshape(n, w // scale, h // scale, dim * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(n, seq // (scale * scale), dim * scale * scale)


class PixelShuffleConnector(Connector):
    """Pixel shuffle then a linear projection (Idefics3: 4x fewer tokens for scale 2)."""

    def __init__(self, vision_dim: int, text_dim: int, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = LinearProjection(vision_dim * scale_factor**2, text_dim)

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        return self.modality_projection(pixel_shuffle(features, grid, self.scale_factor))

    def repeated_blocks(self) -> list[nn.Module]:
        return []

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        return shuffled_tokens(grid, self.scale_factor)


class MappingNetworkConnector(Connector):
    """MAPL mapping network (Mañas et al., 2023): a transformer over projected patches and learned queries.

    Patches are projected to ``mapping_hidden_size``, concatenated with ``num_latents`` learned
    query embeddings, run through ``depth`` pre-norm transformer layers (padding masked), and the
    query outputs are projected to the language model's width.
    """

    def __init__(self, vision_dim: int, text_dim: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        width = cfg.mapping_hidden_size
        self.input_proj = nn.Linear(vision_dim, width)
        self.queries = nn.Parameter(torch.randn(cfg.num_latents, width) * width**-0.5)
        layer = nn.TransformerEncoderLayer(
            width,
            max(1, width // 64),
            4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, text_dim)

    ignores_padding = True

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.transformer.layers)

    def no_weight_decay(self) -> set[str]:
        return {"queries"}

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        return self.queries.shape[0]

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        n = features.shape[0]
        queries = self.queries.unsqueeze(0).expand(n, -1, -1)
        x = torch.cat([self.input_proj(features), queries], dim=1)
        padding = None
        if patch_mask is not None:
            padding = torch.cat(
                [~patch_mask.bool(), patch_mask.new_zeros(queries.shape[:2], dtype=torch.bool)], 1
            )
        x = self.transformer(x, src_key_padding_mask=padding)
        return self.output_proj(self.norm(x[:, -queries.shape[1] :]))


ConnectorBuilder = Callable[[ConnectorConfig, int, int, int], Connector]


def _projection(cfg: ConnectorConfig, vision_dim: int, text_dim: int, text_intermediate: int) -> Connector:
    if cfg.type == "linear":
        return ProjectionConnector(LinearProjection(vision_dim, text_dim))
    hidden = cfg.mlp_intermediate_size or text_intermediate
    return ProjectionConnector(GatedMLP(vision_dim, hidden, text_dim, cfg.mlp_act))


#: ``connector.type`` name -> ``builder(cfg, vision_dim, text_dim, text_intermediate)``;
#: ``register_connector`` adds one.
CONNECTORS: dict[str, ConnectorBuilder] = {
    "linear": _projection,
    "mlp": _projection,
    "perceiver": lambda cfg, vision_dim, text_dim, text_intermediate: PerceiverConnector(
        vision_dim, text_dim, cfg.mlp_intermediate_size or text_intermediate, cfg
    ),
    "pixel_shuffle": lambda cfg, vision_dim, text_dim, _: PixelShuffleConnector(
        vision_dim, text_dim, cfg.scale_factor
    ),
    "mapping_network": lambda cfg, vision_dim, text_dim, _: MappingNetworkConnector(
        vision_dim, text_dim, cfg
    ),
}


def register_connector(name: str, builder: ConnectorBuilder) -> None:
    """Make ``connector.type: <name>`` build ``builder(cfg, vision_dim, text_dim, text_intermediate)``, a
    ``Connector`` subclass that declares its blocks and no-decay parameters, without editing this file."""
    if name in CONNECTORS:
        raise ValueError(f"connector type {name!r} is already registered.")
    CONNECTORS[name] = builder


def build_connector(
    cfg: ConnectorConfig, vision_dim: int, text_dim: int, text_intermediate: int
) -> Connector:
    """Build the connector named by ``cfg.type`` for the given vision and text widths."""
    if cfg.type not in CONNECTORS:
        raise ValueError(
            f"Unknown connector.type {cfg.type!r}; registered types: {', '.join(CONNECTORS)} "
            "(vlm.connectors.register_connector adds one)."
        )
    return CONNECTORS[cfg.type](cfg, vision_dim, text_dim, text_intermediate)


def visual_tokens_per_tile(config: VLMConfig, tile: tuple[int, int] | None = None) -> int:
    """Visual tokens the model of ``config`` makes per tile of ``tile`` (height, width) pixels (default:
    the tower's ``image_size`` square): the processor's ``image_seq_len``, the same for either fusion.

    Asked of the connector itself (``Connector.tokens_per_tile``, so registered connectors answer too),
    built on the meta device: no weights, no memory. The widths do not change the count, so a backbone
    loaded from a path (whose sizes the config may leave out) is stood in for by the config's sizes.
    """
    height, width = tile or (config.vision.image_size, config.vision.image_size)
    patch = config.vision.patch_size
    if height % patch or width % patch:
        raise ValueError(
            f"A {height}x{width} px tile is not a whole number of vision.patch_size={patch} patches."
        )
    text = config.language.config
    text_dim = text.get("hidden_size", config.vision.hidden_size)
    with torch.device("meta"):
        connector = build_connector(
            config.connector, config.vision.hidden_size, text_dim, text.get("intermediate_size", 4 * text_dim)
        )
    return connector.tokens_per_tile((height // patch, width // patch))
