"""VisionLanguageModel: vision tower + connector + causal language model, fused one of two ways.

``forward`` takes the tensors of transformers' Idefics2/Idefics3ForConditionalGeneration
(``input_ids`` with expanded ``<image>`` tokens, ``attention_mask``, ``pixel_values`` of shape
(batch, images, 3, H, W) zero-padded, ``pixel_attention_mask``, ``labels``) and gives the same
logits for the same weights (see ``vlm.hf``). ``generate`` runs greedy or sampled decoding with a
KV cache, encoding the images once (the loop and its back-ends are in ``vlm.generation``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.initialization import no_init_weights
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from vlm import generation
from vlm.attention import VARLEN_KERNELS
from vlm.config import IGNORE_INDEX, IMAGE_TOKEN, VLMConfig
from vlm.connectors import build_connector
from vlm.cross_attention import (
    CrossAttentionFusion,
    CrossAttentionMedia,
    find_decoder_layers,
    media_by_sample,
    text_image_index,
)
from vlm.language_model import build_language_model, language_config_of, text_dims
from vlm.loss import linear_cross_entropy
from vlm.packed import document_attention_mask, first_image_of_document, padding_free_kwargs
from vlm.vision import build_vision_tower, patch_attention_mask_from_pixels, size_groups

#: transformers causal LMs whose logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping, scaling).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3"})
#: Files of ``VisionLanguageModel.save_pretrained``.
CONFIG_FILE, WEIGHTS_FILE = "vlm_config.json", "model.safetensors"


@dataclass
class VLMOutput:
    """Output of ``VisionLanguageModel.forward``; ``loss`` is set when ``labels`` are given, ``logits``
    unless ``return_logits=False``."""

    logits: Tensor | None
    loss: Tensor | None = None
    past_key_values: DynamicCache | None = None
    image_features: Tensor | None = None


class VisionLanguageModel(nn.Module):
    """An Idefics2/Idefics3-style VLM; one config value picks its fusion (autoregressive or cross-attn)."""

    def __init__(self, config: VLMConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = build_vision_tower(config.vision)
        self.language_model, self.special_token_ids = build_language_model(config.language, tokenizer)
        dims = text_dims(self.language_model.config)
        self.connector = build_connector(
            config.connector, self.vision_tower.hidden_size, dims.hidden_size, dims.intermediate_size
        )
        image_token_id = config.image_token_id
        if image_token_id is None:
            image_token_id = self.special_token_ids.get(IMAGE_TOKEN)
        if image_token_id is None:
            raise ValueError(
                f"No image token id: add {IMAGE_TOKEN!r} to language.special_tokens or set image_token_id."
            )
        self.image_token_id = image_token_id
        if config.fusion == "cross_attention":
            self.cross_attention = CrossAttentionFusion(
                self.language_model, config.cross_attention, dims.hidden_size
            )
        elif config.fusion != "autoregressive":
            raise ValueError(
                f"Unknown fusion {config.fusion!r}; choose 'autoregressive' or 'cross_attention'."
            )

    # --- images ---------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """Encode images into visual tokens (n_real_images, tokens_per_image, text_dim).

        ``pixel_values`` is (batch, images, 3, H, W), where all-zero images are padding and are
        dropped (as transformers does), or a flat (n_images, 3, H, W) of real images;
        ``pixel_attention_mask`` has the same leading dims and (H, W), 1 on real pixels. With a
        mask, a canvas that is not a multiple of the patch size is padded up to one (the mask
        declares the padding): transformers' Idefics2 processor makes such canvases (e.g. 980x735)
        and its model drops the partial edge patches, which the ``all`` patch rule masks out here,
        with the same result. Without a mask such a size is an error. Where the padding cannot change
        the visual tokens (a connector that ignores padding: the perceiver of the Idefics2 recipe), the
        tower skips it: packed
        into one sequence when its attention allows (``VisionTower.supports_packing``, NaViT), else
        each image on its own real extent with bucketed positions (``_encode_cropped``).
        """
        if pixel_values.dim() == 5:
            flat = pixel_values.flatten(0, 1)
            real = (flat != 0).flatten(1).any(1)
            pixel_values = flat[real]
            if pixel_attention_mask is not None:
                pixel_attention_mask = pixel_attention_mask.flatten(0, 1)[real]
        elif pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be (batch, images, 3, H, W) or (n_images, 3, H, W); "
                f"got {tuple(pixel_values.shape)}."
            )
        pixel_values = pixel_values.to(self.vision_tower_dtype)
        patch = self.vision_tower.patch_size
        pad_h, pad_w = -pixel_values.shape[-2] % patch, -pixel_values.shape[-1] % patch
        if pixel_attention_mask is not None and (pad_h or pad_w):
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
            pixel_attention_mask = F.pad(pixel_attention_mask, (0, pad_w, 0, pad_h))
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        patch_mask = None
        if pixel_attention_mask is not None:
            patch_mask = patch_attention_mask_from_pixels(
                pixel_attention_mask, patch, self.config.vision.patch_mask_rule
            )
        padded = patch_mask is not None and not bool(patch_mask.all())
        if padded and self.connector.ignores_padding and self.vision_tower.supports_packing:
            features = self.vision_tower(pixel_values, patch_mask, packed=True)
        elif padded and self._padding_can_be_cropped:
            return self._encode_cropped(pixel_values, patch_mask)
        else:
            features = self.vision_tower(pixel_values, patch_mask)
        return self.connector(features, grid, None if patch_mask is None else patch_mask.flatten(1))

    @property
    def _padding_can_be_cropped(self) -> bool:
        """Whether the padded patches of a canvas can be cut off before the tower without changing any
        visual token: positions from each image's own real patches (``bucketed``) and a connector that
        ignores padding (so its output does not depend on the patch grid either)."""
        return (
            self.config.vision.max_size_groups > 1
            and self.config.vision.position_embedding == "bucketed"
            and self.connector.ignores_padding
        )

    def _encode_cropped(self, pixel_values: Tensor, patch_mask: Tensor) -> Tensor:
        """Encode each image on its own real patch extent instead of the batch's canvas, in at most
        ``vision.max_size_groups`` tower calls (``size_groups``): the tower and the perceiver skip the
        padding (Idefics2 batches pad every image to the largest one), with the same visual tokens."""
        patch = self.vision_tower.patch_size
        real_rows, real_cols = patch_mask.any(2), patch_mask.any(1)
        extents = torch.stack(
            [
                real_rows.shape[1] - real_rows.flip(1).int().argmax(1),
                real_cols.shape[1] - real_cols.flip(1).int().argmax(1),
            ],
            dim=1,
        )
        tokens = None
        for (h, w), indices in size_groups(extents.tolist(), self.config.vision.max_size_groups):
            index = torch.tensor(indices, device=pixel_values.device)
            group_mask = patch_mask[index, :h, :w]
            features = self.vision_tower(pixel_values[index, :, : h * patch, : w * patch], group_mask)
            group_tokens = self.connector(features, (h, w), group_mask.flatten(1))
            if tokens is None:
                tokens = group_tokens.new_empty(len(extents), *group_tokens.shape[1:])
            tokens[index] = group_tokens
        return tokens

    # --- what the training code needs to know -------------------------------------------

    def repeated_blocks(self) -> dict[str, list[nn.Module]]:
        """Each component's repeated blocks, as the component declares them (the language model's decoder
        layers): the linear layers LoRA adapts in a backbone, and the units of FSDP2 and activation
        checkpointing. Components in build order; ``cross_attention`` only with that fusion."""
        blocks = {
            "vision_tower": self.vision_tower.repeated_blocks(),
            "connector": self.connector.repeated_blocks(),
        }
        if self.config.fusion == "cross_attention":
            blocks["cross_attention"] = self.cross_attention.repeated_blocks()
        blocks["language_model"] = list(find_decoder_layers(self.language_model))
        return blocks

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the components declare as taking no weight decay (learned queries,
        latents), besides the 1-D ones and embedding tables that never do."""
        return {
            f"{name}.{param}"
            for name in ("vision_tower", "connector")
            for param in getattr(self, name).no_weight_decay()
        }

    @property
    def vision_tower_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def _cross_attention_media(
        self, input_ids: Tensor, image_features: Tensor, tiles_per_image: Tensor | None
    ) -> CrossAttentionMedia:
        """Group visual tokens by sample (``vlm.cross_attention.media_by_sample``), after checking that
        the text holds one ``<image>`` marker per image."""
        images_per_sample = (input_ids == self.image_token_id).sum(1)
        n_tiles = image_features.shape[0]
        if tiles_per_image is None:
            tiles_per_image = torch.ones(n_tiles, dtype=torch.long, device=input_ids.device)
        if int(tiles_per_image.sum()) != n_tiles:
            raise ValueError(
                f"tiles_per_image sums to {int(tiles_per_image.sum())} but {n_tiles} tiles were given."
            )
        self._check_image_count(int(images_per_sample.sum()), len(tiles_per_image), "<image> markers", 1)
        return media_by_sample(images_per_sample, image_features, tiles_per_image)

    def _check_tiles_per_sample(self, input_ids: Tensor, tiles_per_sample: Tensor, per_tile: int) -> None:
        in_text = (input_ids == self.image_token_id).sum(1).cpu()
        expected = tiles_per_sample.cpu() * per_tile
        bad = (in_text != expected).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            raise ValueError(
                f"Row {row} of input_ids holds {int(in_text[row])} <image> tokens but its "
                f"{int(tiles_per_sample[row])} tiles need {int(expected[row])} (rows {bad} disagree). "
                "Build the text and images of a sample together with the processor of this model."
            )

    @staticmethod
    def _check_image_count(n_in_text: int, n_images: int, what: str, per_image: int) -> None:
        if n_in_text != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_in_text} {what} but {n_images} images were given, which need "
                f"{n_images} x {per_image} = {n_images * per_image}. Build the text with the processor of "
                "this model (it expands each image to the connector's token count), or pass matching images."
            )

    # --- language model -------------------------------------------------------------------

    def language_forward(
        self,
        inputs_embeds: Tensor,
        input_ids: Tensor,
        media: CrossAttentionMedia | None,
        images_seen: Tensor | None,
        hidden_states_only: bool = False,
        document_starts: Tensor | None = None,
        **lm_kwargs,
    ):
        """Run the LM on merged embeddings; with cross-attention, condition its blocks on ``media``
        (in packed rows, ``document_starts`` keeps each document's text to its own images).
        ``hidden_states_only`` runs the decoder without the output embedding (``.last_hidden_state``)."""
        context = nullcontext()
        if media is not None:
            markers = input_ids == self.image_token_id
            text_index = text_image_index(markers, images_seen)
            first_image = (
                None if document_starts is None else first_image_of_document(markers, document_starts)
            )
            context = self.cross_attention.condition(
                media.media, media.media_image_index, text_index, first_image
            )
        module = self.language_model.base_model if hidden_states_only else self.language_model
        with context:
            return module(inputs_embeds=inputs_embeds, **lm_kwargs)

    @property
    def plain_output_embedding(self) -> nn.Linear | None:
        """The LM's output embedding when its logits are exactly ``lm_head(hidden)`` (no soft-capping or
        scaling, no adapter on it), so the loss can be computed from hidden states (``vlm.loss``)."""
        head = self.language_model.get_output_embeddings()
        if type(head) is not nn.Linear or self.language_model.config.model_type not in PLAIN_HEAD_MODEL_TYPES:
            return None
        return head

    def _labelled_loss(self, hidden: Tensor, labels: Tensor, head: nn.Linear) -> Tensor:
        """Mean next-token loss from the last hidden states, on the labelled positions only."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], head.bias)

    def embed_inputs(
        self,
        input_ids: Tensor,
        image_features: Tensor | None,
        tiles_per_sample: Tensor | None = None,
        tiles_per_image: Tensor | None = None,
    ) -> tuple[Tensor, CrossAttentionMedia | None]:
        """The LM input embeddings of ``input_ids``: with autoregressive fusion the visual tokens
        replace the ``<image>`` tokens; with cross-attention they come back grouped by sample as media."""
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        if image_features is None:
            if self.config.fusion == "autoregressive" and bool((input_ids == self.image_token_id).any()):
                raise ValueError("input_ids contain <image> tokens but no pixel_values were given.")
            return inputs_embeds, None
        if self.config.fusion == "cross_attention":
            return inputs_embeds, self._cross_attention_media(input_ids, image_features, tiles_per_image)
        image_mask = input_ids == self.image_token_id
        n_images, per_image = image_features.shape[:2]
        if tiles_per_sample is not None:
            self._check_tiles_per_sample(input_ids, tiles_per_sample, per_image)
        self._check_image_count(int(image_mask.sum()), n_images, "<image> tokens", per_image)
        features = image_features.to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask[..., None], features), None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        pixel_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        image_features: Tensor | None = None,
        tiles_per_sample: Tensor | None = None,
        tiles_per_image: Tensor | None = None,
        document_ids: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
        cu_seq_lens_k: Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        return_logits: bool = True,
    ) -> VLMOutput:
        """Logits for every position and, given ``labels`` (-100 = ignored), the mean next-token loss.

        ``return_logits=False`` with ``labels`` (what training uses) returns the loss only
        (``logits=None``), computed from the hidden states of the labelled positions chunk by chunk
        (``vlm.loss.linear_cross_entropy``) instead of from the whole batch's logits: the same value,
        without the (batch, seq, vocab) tensors (for LMs whose head is a plain linear layer, see
        ``PLAIN_HEAD_MODEL_TYPES``; others compute the logits as usual).

        ``image_features`` (from ``encode_images``) may replace ``pixel_values``. With the
        processor's flat layout, ``tiles_per_sample`` checks each row's image tokens and
        ``tiles_per_image`` groups the tiles of each image for cross-attention (default: one
        tile per image).

        Packed rows (several documents per row, ``datamodules.packing``; attention and cross-attention
        stay within each document), two layouts (``vlm.packed``):
        - padding-free (transformers' contract): ``position_ids`` restarting at 0 at each document start,
          ``cu_seq_lens_q/k`` and ``max_length_q/k`` over the rows flattened to one, no
          ``attention_mask``; ``document_ids``, if given, is not used. With a varlen kernel
          (``vlm.attention.VARLEN_KERNELS``) the rows are flattened to one and the kernel gets those;
          sdpa / flex_attention / eager keep the rows and transformers builds each row's document mask
          (boolean, or a BlockMask) from ``position_ids``. Logits keep the (batch, seq) layout.
        - dense baseline: ``document_ids`` (batch, seq; 0 = padding) without ``cu_seq_lens``: the model
          builds a causal block-diagonal (batch, 1, seq, seq) mask in place of ``attention_mask``.
        """
        varlen = padding_free_kwargs(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)
        padding_free = varlen is not None
        if padding_free and attention_mask is not None:
            raise ValueError(
                "A padding-free batch (cu_seq_lens_q/k, max_length_q/k) takes no attention_mask: collate it "
                "with datamodules.packing.collate_rows."
            )
        packed = padding_free or document_ids is not None
        if packed and position_ids is None:
            raise ValueError("Packed rows need per-document position_ids (restarting at 0 at each document).")
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, pixel_attention_mask)
        rows = input_ids.shape
        if padding_free and self.language_model.config._attn_implementation in VARLEN_KERNELS:
            if (
                self.config.fusion == "autoregressive"
                and tiles_per_sample is not None
                and image_features is not None
            ):
                self._check_tiles_per_sample(input_ids, tiles_per_sample, image_features.shape[1])  # per row
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
            labels = None if labels is None else labels.reshape(1, -1)
            tiles_per_sample = None
        else:  # sdpa, flex, eager: transformers builds each row's document mask from its position_ids
            varlen = None
        inputs_embeds, media = self.embed_inputs(input_ids, image_features, tiles_per_sample, tiles_per_image)
        if document_ids is not None and not padding_free:
            attention_mask = document_attention_mask(document_ids, inputs_embeds.dtype)
        head = None if return_logits or labels is None else self.plain_output_embedding
        # No KV cache: a full forward (training, scoring) does not reuse it, and activation checkpointing
        # would append the recomputed keys to it a second time.
        out = self.language_forward(
            inputs_embeds,
            input_ids,
            media,
            None,
            hidden_states_only=head is not None,
            document_starts=position_ids == 0 if packed else None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **(varlen or {}),
        )
        if head is not None:
            loss = self._labelled_loss(out.last_hidden_state, labels, head)
            return VLMOutput(logits=None, loss=loss, image_features=image_features)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].flatten(0, 1)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
            loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return VLMOutput(logits=out.logits.reshape(*rows, -1), loss=loss, image_features=image_features)

    # --- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        """Decode after left-padded prompts; returns prompts + new tokens (``vlm.generation.generate``:
        greedy or sampled, eos and stop strings, images encoded once, KV cache)."""
        return generation.generate(self, *args, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the weights (``model.safetensors``) and a config that rebuilds this very model
        (``vlm_config.json``: the language model's actual vocabulary, no ``pretrained`` paths) to
        ``folder``, for ``from_pretrained``. This project's format, for the models transformers has no
        class for (cross-attention fusion, timm / open_clip towers); see ``vlm.hf.to_transformers``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        language = dataclasses.replace(
            language_config_of(self.language_model.config),
            attn_implementation=self.config.language.attn_implementation,
        )
        config = dataclasses.replace(
            self.config,
            vision=dataclasses.replace(self.config.vision, pretrained=None),
            language=language,
            image_token_id=self.image_token_id,
        )
        saved = {"config": dataclasses.asdict(config), "special_token_ids": self.special_token_ids}
        (folder / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
        safetensors.torch.save_model(self, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> VisionLanguageModel:
        """The model ``save_pretrained`` wrote to ``folder``, in eval mode."""
        config_path = Path(folder) / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{config_path} does not exist: VisionLanguageModel.from_pretrained reads a folder written "
                "by save_pretrained (a transformers folder, with config.json, loads with "
                "AutoModelForImageTextToText.from_pretrained)."
            )
        saved = json.loads(config_path.read_text())
        with no_init_weights():
            model = cls(VLMConfig.from_dict(saved["config"]))
        model.special_token_ids = saved["special_token_ids"]
        safetensors.torch.load_model(model, str(Path(folder) / WEIGHTS_FILE))
        return model.eval()
