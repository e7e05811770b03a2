"""Vision towers: a ViT that turns a padded batch of images into patch tokens, whatever library built it.

Every tower maps pixels (N, 3, H, W) of any size that is a multiple of its patch size, plus an optional
patch mask (N, H/p, W/p) that is False on padding, to patch tokens (N, H/p * W/p, hidden_size): no class
token, no pooling head, padded patches never attended to as keys. Three backends share one position
embedding scheme (``bucketed``: NaViT / Idefics2; ``interpolated``: timm's bicubic resize):

- ``siglip``: transformers' SigLIP vision model, the Idefics2/Idefics3 tower (same state-dict keys);
- ``timm``: a timm ``VisionTransformer`` (``siglip_to_timm_state_dict`` ports transformers weights);
- ``open_clip``: an open_clip visual tower (its own ViT, or a timm trunk run as a ``timm`` tower).

The wrapped model is always at ``tower.vit``; each tower declares its repeated blocks
(``repeated_blocks``: what LoRA adapts and FSDP2 shards) and its no-decay parameters. Other towers
plug in with ``register_vision_backend``.

The ``siglip`` tower can also pack (NaViT): under flex attention or a varlen kernel, the real patches of
all images run as one sequence, each image attending only to itself, with no padded canvas.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.masking_utils import create_bidirectional_mask

from vlm.attention import (
    VARLEN_KERNELS,
    packed_implementation,
    packed_sequences_mask,
    resolve_attention,
    runs_packed_sequences,
)
from vlm.config import VisionConfig
from vlm.language_model import resolve_path

POSITION_EMBEDDINGS = ("bucketed", "interpolated")


def _patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of the patch size {patch_size}: resize or pad "
            f"images to a multiple of `vision.patch_size` ({patch_size}), as the processor does."
        )
    return height // patch_size, width // patch_size


def patch_attention_mask_from_pixels(
    pixel_attention_mask: Tensor, patch_size: int, rule: Literal["all", "any"]
) -> Tensor:
    """Patch mask (N, H/p, W/p) from a pixel mask (N, H, W) that is nonzero on real pixels.

    A patch is real if ``all`` its pixels are (Idefics2) or if ``any`` is (Idefics3): transformers'
    rules, so that features match the released models on padded batches.
    """
    _patch_grid(*pixel_attention_mask.shape[1:], patch_size)
    patches = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    real_pixels = patches.sum(dim=(-1, -2))
    if rule == "all":
        return real_pixels == patch_size * patch_size
    if rule == "any":
        return real_pixels > 0
    raise ValueError(f"Unknown patch mask rule {rule!r}; valid rules: 'all' (Idefics2), 'any' (Idefics3).")


def size_groups(
    extents: Sequence[tuple[int, int]], max_groups: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """Images grouped for encoding by their (rows, columns) patch extent, as ``(extent, indices)``.

    Images of one extent form one group; beyond ``max_groups`` distinct extents, neighbouring ones (in
    order of area) are merged into ``max_groups`` groups, each padded to its largest rows and columns.
    """
    if max_groups < 1:
        raise ValueError(f"vision.max_size_groups must be >= 1 (got {max_groups}).")
    by_extent: dict[tuple[int, int], list[int]] = {}
    for index, extent in enumerate(extents):
        by_extent.setdefault(tuple(extent), []).append(index)
    ordered = sorted(by_extent, key=lambda e: (e[0] * e[1], e))
    n = min(max_groups, len(ordered))
    chunks = [ordered[round(k * len(ordered) / n) : round((k + 1) * len(ordered) / n)] for k in range(n)]
    return [
        ((max(h for h, _ in chunk), max(w for _, w in chunk)), [i for e in chunk for i in by_extent[e]])
        for chunk in chunks
    ]


def bucketed_position_ids(patch_attention_mask: Tensor, num_patches_per_side: int) -> Tensor:
    """Position ids (N, h*w) into a square grid table for each image's real patches (NaViT / Idefics2).

    Each real patch's fractional coordinates within its image are bucketized into the
    ``num_patches_per_side`` grid; padded patches get id 0. Bit-identical to transformers'
    ``Idefics2VisionEmbeddings`` (same ops, same float32 arithmetic), which pretrained Idefics rely on.
    """
    batch_size, max_patches_h, max_patches_w = patch_attention_mask.shape
    device = patch_attention_mask.device
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    step_h = 1.0 / patch_attention_mask[:, :, 0].sum(dim=1)
    step_w = 1.0 / patch_attention_mask[:, 0, :].sum(dim=1)
    coords_h = torch.arange(max_patches_h, device=device, dtype=torch.float32)[None, :] * step_h[:, None]
    coords_w = torch.arange(max_patches_w, device=device, dtype=torch.float32)[None, :] * step_w[:, None]
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * num_patches_per_side + bucket_w[:, None, :]).reshape(batch_size, -1)
    return torch.where(patch_attention_mask.reshape(batch_size, -1), ids, 0)


def _grid_position_embeddings(table: Tensor, patch_attention_mask: Tensor, mode: str) -> Tensor:
    """(N or 1, h*w, D) position embeddings of a padded patch grid from a square (G*G, D) table."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"The position table has {table.shape[0]} rows, not a square grid.")
    if mode == "bucketed":
        return F.embedding(bucketed_position_ids(patch_attention_mask, side), table)
    # Resized to the whole padded grid, as timm's dynamic_img_size forward does for unpadded images.
    return resample_abs_pos_embed(
        table[None], new_size=list(patch_attention_mask.shape[1:]), old_size=[side, side], num_prefix_tokens=0
    )


def _patchify(conv: nn.Conv2d, pixel_values: Tensor) -> Tensor:
    return conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)


def _key_padding_mask(patch_attention_mask: Tensor, num_prefix_tokens: int) -> Tensor | None:
    """SDPA boolean mask (N, 1, 1, prefix + h*w), True = attend; None without padding (the fast path)."""
    if patch_attention_mask.all():
        return None
    keys = F.pad(patch_attention_mask.flatten(1), (num_prefix_tokens, 0), value=True)
    return keys[:, None, None, :]


class VisionTower(nn.Module):
    """Base of all towers: checks inputs, then ``_encode`` maps pixels to patch tokens.

    ``forward(pixel_values (N, 3, H, W), patch_attention_mask (N, H/p, W/p) | None)`` returns
    (N, H/p * W/p, hidden_size); H and W are any multiples of ``patch_size``. Each image needs at least
    one real patch (drop all-padding images before the tower, as transformers does).
    """

    def __init__(self, hidden_size: int, patch_size: int, position_embedding: str) -> None:
        super().__init__()
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"Unknown position embedding {position_embedding!r}; valid: {', '.join(POSITION_EMBEDDINGS)}."
            )
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.position_embedding = position_embedding

    def repeated_blocks(self) -> list[nn.Module]:
        """The tower's repeated transformer blocks, in order: LoRA adapts the linear layers inside them,
        FSDP2 shards and activation checkpointing wraps each one. Every tower declares its own."""
        raise NotImplementedError(f"{type(self).__name__} must declare its repeated_blocks().")

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the tower) of parameters that take no weight decay, besides the 1-D ones
        and embedding tables, which never do (``lit_modules.optim.no_weight_decay``)."""
        return set()

    @property
    def supports_packing(self) -> bool:
        """Whether ``forward(..., packed=True)`` can run: the tower's attention keeps packed images apart."""
        return False

    def forward(
        self, pixel_values: Tensor, patch_attention_mask: Tensor | None = None, packed: bool = False
    ) -> Tensor:
        """Patch tokens (N, H/p * W/p, hidden_size) of a padded batch; see the class docstring.

        ``packed``: the real patches of all images go through the transformer as one sequence, each image
        attending only to itself (NaViT), with no padded canvas; the same real-patch tokens, and zeros at
        the padded patches. Needs ``supports_packing``.
        """
        batch_size, _, height, width = pixel_values.shape
        expected = (batch_size, *_patch_grid(height, width, self.patch_size))
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(expected, dtype=torch.bool, device=pixel_values.device)
        elif tuple(patch_attention_mask.shape) != expected:
            raise ValueError(
                f"patch_attention_mask has shape {tuple(patch_attention_mask.shape)}, expected {expected} "
                f"(batch, H / patch_size, W / patch_size) for pixel_values {tuple(pixel_values.shape)}."
            )
        if packed and not self.supports_packing:
            raise ValueError(
                f"The {type(self).__name__} cannot pack images: it needs vision.backend: siglip with "
                "vision.attn_implementation flex_attention or a varlen kernel (flash_attention_2/3, varlen)."
            )
        return self._encode(pixel_values, patch_attention_mask.bool(), packed)

    def _encode(self, pixel_values: Tensor, patch_attention_mask: Tensor, packed: bool) -> Tensor:
        raise NotImplementedError


class SiglipVisionTower(VisionTower):
    """transformers' SigLIP vision model (no head) at ``self.vit``: the Idefics2/Idefics3 vision tower.

    ``vit.state_dict()`` has exactly the keys of ``Idefics2VisionTransformer`` / ``Idefics3VisionTransformer``
    and, in ``bucketed`` mode, the output equals theirs on the same padded batch and patch mask.
    """

    def __init__(self, vit: SiglipVisionModel, position_embedding: str) -> None:
        super().__init__(vit.config.hidden_size, vit.config.patch_size, position_embedding)
        self.vit = vit

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.vit.encoder.layers)

    @property
    def supports_packing(self) -> bool:
        return runs_packed_sequences(self.vit.config._attn_implementation)

    def _encode(self, pixel_values: Tensor, patch_attention_mask: Tensor, packed: bool) -> Tensor:
        embeddings = self.vit.embeddings
        x = _patchify(embeddings.patch_embedding, pixel_values)
        x = x + _grid_position_embeddings(
            embeddings.position_embedding.weight, patch_attention_mask, self.position_embedding
        )
        real = patch_attention_mask.flatten(1)
        if packed:
            # Positions were added on the canvas, so each real patch keeps the embedding it has there.
            attention_mask = packed_sequences_mask(self.vit.config._attn_implementation, real.sum(1))
            tokens = self.vit.encoder(inputs_embeds=x[real][None], attention_mask=attention_mask)
            out = x.new_zeros(x.shape)
            out[real] = self.vit.post_layernorm(tokens.last_hidden_state[0])
            return out
        attention_mask = create_bidirectional_mask(
            config=self.vit.config, inputs_embeds=x, attention_mask=real
        )
        x = self.vit.encoder(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        return self.vit.post_layernorm(x)


class TimmVisionTower(VisionTower):
    """A timm ``VisionTransformer`` at ``self.vit``, run on patch tokens with a key padding mask.

    Prefix tokens (class / register) are used as the model was trained and dropped from the output;
    their position embeddings (if any) are kept as is, only the patch grid's follow the position mode.
    Pooling heads are not used (build the model with ``global_pool=""``); patch dropout is not applied.
    """

    def __init__(self, vit: TimmViT, position_embedding: str) -> None:
        plain_vit = isinstance(vit, TimmViT) and isinstance(vit.patch_embed, PatchEmbed)
        if not plain_vit or vit.pos_embed is None:
            raise ValueError(
                "The timm tower needs a plain ViT (VisionTransformer with PatchEmbed and an absolute "
                f"pos_embed); got {type(vit).__name__}."
            )
        super().__init__(vit.embed_dim, vit.patch_embed.patch_size[0], position_embedding)
        self.vit = vit

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.vit.blocks)

    def _encode(self, pixel_values: Tensor, patch_attention_mask: Tensor, packed: bool) -> Tensor:
        vit = self.vit
        x = vit.patch_embed.norm(_patchify(vit.patch_embed.proj, pixel_values))
        num_prefix_positions = 0 if vit.no_embed_class else vit.num_prefix_tokens
        grid_table = vit.pos_embed[0, num_prefix_positions:]
        x = x + _grid_position_embeddings(grid_table, patch_attention_mask, self.position_embedding)
        prefix_tokens = [token for token in (vit.cls_token, vit.reg_token) if token is not None]
        if prefix_tokens:
            prefix = torch.cat(prefix_tokens, dim=1).expand(x.shape[0], -1, -1)
            if num_prefix_positions:
                prefix = prefix + vit.pos_embed[:, :num_prefix_positions]
            x = torch.cat([prefix, x], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        attn_mask = _key_padding_mask(patch_attention_mask, vit.num_prefix_tokens)
        for block in vit.blocks:
            if vit.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return vit.norm(x)[:, vit.num_prefix_tokens :]


class OpenClipVisionTower(VisionTower):
    """open_clip's own ``VisionTransformer`` (OpenAI CLIP style) at ``self.vit``, without its projection.

    Returns the patch tokens after ``ln_post`` (open_clip's ``output_tokens``), class token dropped.
    Sizes come from the model, not from ``VisionConfig``. Patch dropout is not applied.
    """

    def __init__(self, visual: OpenClipViT, position_embedding: str) -> None:
        if visual.attn_pool is not None:
            raise ValueError("open_clip towers with attentional pooling (CoCa) are not supported.")
        super().__init__(visual.conv1.out_channels, visual.patch_size[0], position_embedding)
        visual.proj = None  # projection into the contrastive space: not part of the patch features
        self.vit = visual

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.vit.transformer.resblocks)

    def _encode(self, pixel_values: Tensor, patch_attention_mask: Tensor, packed: bool) -> Tensor:
        vit = self.vit
        x = _patchify(vit.conv1, pixel_values)
        positions = vit.positional_embedding.to(x.dtype)
        x = x + _grid_position_embeddings(positions[1:], patch_attention_mask, self.position_embedding)
        class_token = (vit.class_embedding.to(x.dtype) + positions[0]).expand(x.shape[0], 1, -1)
        x = vit.ln_pre(torch.cat([class_token, x], dim=1))
        key_mask = _key_padding_mask(patch_attention_mask, num_prefix_tokens=1)
        attn_mask = None
        if key_mask is not None:
            # open_clip casts masks to float and adds them, as (N * heads, L, L) for nn.MultiheadAttention.
            heads, length = vit.transformer.resblocks[0].attn.num_heads, x.shape[1]
            bias = torch.zeros(key_mask.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~key_mask, -math.inf).expand(-1, heads, length, -1)
            attn_mask = bias.reshape(-1, length, length)
        x = vit.transformer(x, attn_mask=attn_mask)
        return vit.ln_post(x[:, 1:])


def siglip_to_timm_state_dict(hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map transformers SigLIP / Idefics vision weights to a timm ViT's state dict (so they load strictly).

    Takes ``SiglipVisionModel`` / ``Idefics2VisionTransformer`` keys (no prefix); q/k/v are fused into
    ``qkv`` and the attention-pooling head (``head.*``), which towers do not use, is dropped. The timm
    model must use the same activation (``gelu_tanh`` for ``gelu_pytorch_tanh``, what the timm backend
    builds from ``VisionConfig.hidden_act``).
    """
    renames = [
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
        (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
        (r"^post_layernorm\.", "norm."),
    ]
    state_dict = {}
    for key, value in hf_state_dict.items():
        if key.startswith("head."):
            continue
        for pattern, replacement in renames:
            new_key, found = re.subn(pattern, replacement, key)
            if found:
                state_dict[new_key] = value
                break
        else:
            raise KeyError(f"Unexpected SigLIP vision weight {key!r} (expected SiglipVisionModel keys).")
    state_dict["pos_embed"] = state_dict["pos_embed"][None]
    for q_key in [key for key in state_dict if ".attn.q." in key]:
        parts = [state_dict.pop(q_key.replace(".attn.q.", f".attn.{name}.")) for name in "qkv"]
        state_dict[q_key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
    return state_dict


def _load_siglip(path: str, attention: str = "sdpa") -> SiglipVisionModel:
    # A local SigLIP / Idefics vision model saved with save_pretrained (``~`` and ``${VAR}`` expanded, as
    # YAML configs cannot) or a hub name; sizes come from the checkpoint.
    return SiglipVisionModel.from_pretrained(
        resolve_path(path), attn_implementation=attention, vision_use_head=False
    )


def siglip_config_kwargs(cfg: VisionConfig) -> dict[str, Any]:
    """transformers SigLIP / Idefics vision-config arguments for the sizes in ``cfg``."""
    return dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def _build_siglip(cfg: VisionConfig) -> VisionTower:
    attention = resolve_attention(cfg.attn_implementation, "vision.attn_implementation")
    if attention in VARLEN_KERNELS:  # so that packed images reach the kernel as sequences
        attention = packed_implementation(attention)
    if cfg.pretrained:
        return SiglipVisionTower(_load_siglip(cfg.pretrained, attention), cfg.position_embedding)
    config = SiglipVisionConfig(
        **siglip_config_kwargs(cfg), vision_use_head=False, attn_implementation=attention
    )
    return SiglipVisionTower(SiglipVisionModel(config), cfg.position_embedding)


def _build_timm(cfg: VisionConfig) -> VisionTower:
    if not cfg.model_name or not timm.is_model(cfg.model_name):
        raise ValueError(
            f"Unknown timm model {cfg.model_name!r} for `vision.model_name`; pick a ViT from "
            f"timm.list_models('vit_*'), e.g. 'vit_so400m_patch14_siglip_384'."
        )
    vit = timm.create_model(
        cfg.model_name,
        pretrained=False,
        num_classes=0,
        global_pool="",
        dynamic_img_size=True,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_layers,
        num_heads=cfg.num_heads,
        # timm sizes the MLP as int(dim * mlp_ratio): half a unit above, float error cannot truncate it.
        mlp_ratio=(cfg.intermediate_size + 0.5) / cfg.hidden_size,
        act_layer={"gelu_pytorch_tanh": "gelu_tanh"}.get(cfg.hidden_act, cfg.hidden_act),
    )
    if cfg.pretrained:
        vit.load_state_dict(siglip_to_timm_state_dict(_load_siglip(cfg.pretrained).state_dict()))
    return TimmVisionTower(vit, cfg.position_embedding)


def _build_open_clip(cfg: VisionConfig) -> VisionTower:
    if not cfg.model_name:
        raise ValueError("`vision.model_name` must name an open_clip model (see open_clip.list_models()).")
    pretrained = None if cfg.pretrained is None else resolve_path(cfg.pretrained)
    visual = open_clip.create_model(cfg.model_name, pretrained=pretrained).visual
    if isinstance(visual, TimmModel):
        visual.trunk.reset_classifier(0, global_pool="")  # drops the MAP head of SigLIP trunks
        return TimmVisionTower(visual.trunk, cfg.position_embedding)
    if isinstance(visual, OpenClipViT):
        return OpenClipVisionTower(visual, cfg.position_embedding)
    raise ValueError(f"open_clip model {cfg.model_name!r} has a {type(visual).__name__} tower, not a ViT.")


#: ``vision.backend`` name -> builder of the tower from its ``VisionConfig``; ``register_vision_backend``
#: adds one.
VISION_BACKENDS: dict[str, Callable[[VisionConfig], VisionTower]] = {
    "siglip": _build_siglip,
    "timm": _build_timm,
    "open_clip": _build_open_clip,
}


def register_vision_backend(name: str, builder: Callable[[VisionConfig], VisionTower]) -> None:
    """Make ``vision.backend: <name>`` build a tower with ``builder(cfg)``, without editing this file.

    The tower subclasses ``VisionTower`` and declares its ``repeated_blocks`` (and any
    ``no_weight_decay`` parameters): that is all LoRA, FSDP2, activation checkpointing and the optimizer
    need from it."""
    if name in VISION_BACKENDS:
        raise ValueError(f"vision backend {name!r} is already registered.")
    VISION_BACKENDS[name] = builder


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """Build the tower ``cfg.backend`` names, with random weights unless ``cfg.pretrained`` is set.

    ``siglip`` and ``timm`` take their sizes and activation from ``cfg`` (for ``timm``, ``model_name``
    picks the block structure: class token, norms, ...). ``pretrained`` (``~`` and ``${VAR}`` expanded) is
    a local transformers SigLIP / Idefics vision model dir: ``siglip`` then takes its sizes from the
    checkpoint, ``timm`` loads it into the ``cfg``-sized model (sizes must agree). ``open_clip`` takes
    everything from the named model and ``pretrained`` is an open_clip checkpoint file. Read sizes from
    the returned tower's ``hidden_size`` / ``patch_size``, not from ``cfg``.
    """
    if cfg.backend not in VISION_BACKENDS:
        raise ValueError(
            f"Unknown vision.backend {cfg.backend!r}; registered backends: {', '.join(VISION_BACKENDS)} "
            "(vlm.vision.register_vision_backend adds one)."
        )
    if cfg.backend in ("timm", "open_clip") and cfg.attn_implementation not in ("auto", "sdpa"):
        raise ValueError(
            f"vision.attn_implementation={cfg.attn_implementation!r}: the {cfg.backend} tower calls torch's "
            "sdpa itself; set it to sdpa or auto, or use vision.backend: siglip for other implementations."
        )
    return VISION_BACKENDS[cfg.backend](cfg)
