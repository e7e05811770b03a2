"""A new vision tower and a new connector, defined here with names no project regex would know (a stack
called ``encoder`` of blocks with ``mix`` / ``ffn`` layers, queries called ``query_tokens``), plug in
through the registries: LoRA, FSDP2 units, activation checkpointing and weight decay follow what they
declare."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from lit_modules.optim import no_weight_decay, param_groups
from lit_modules.policy import TrainingPolicy, apply_policy
from lit_modules.sharding import checkpoint_blocks, shard
from vlm.config import ConnectorConfig, VisionConfig, get_preset
from vlm.connectors import CONNECTORS, Connector, register_connector, visual_tokens_per_tile
from vlm.model import VisionLanguageModel
from vlm.vision import VISION_BACKENDS, VisionTower, register_vision_backend

QUERIES = 3


class MixBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.ffn = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(torch.tanh(self.mix(x)))


class StripeTower(VisionTower):
    """Patches through a stack named ``encoder``, then a ``head`` outside the blocks (never adapted)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.patch_size, cfg.position_embedding)
        self.stem = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.encoder = nn.ModuleList(MixBlock(cfg.hidden_size) for _ in range(cfg.num_layers))
        self.head = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.encoder)

    def _encode(self, pixel_values: Tensor, patch_attention_mask: Tensor, packed: bool) -> Tensor:
        x = self.stem(pixel_values).flatten(2).transpose(1, 2)
        for block in self.encoder:
            x = block(x)
        return self.head(x)


class QueryStack(Connector):
    """``QUERIES`` learned ``query_tokens`` plus the masked mean patch, refined by a stack of ``stages``."""

    ignores_padding = True

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, text_dim: int, text_intermediate: int) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(QUERIES, text_dim))
        self.project = nn.Linear(vision_dim, text_dim)
        self.stages = nn.ModuleList(MixBlock(text_dim) for _ in range(2))

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.stages)

    def no_weight_decay(self) -> set[str]:
        return {"query_tokens"}

    def tokens_per_tile(self, grid: tuple[int, int]) -> int:
        return self.query_tokens.shape[0]

    def forward(self, features: Tensor, grid: tuple[int, int], patch_mask: Tensor | None = None) -> Tensor:
        weights = torch.ones(features.shape[:2]) if patch_mask is None else patch_mask.float()
        pooled = (features * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        x = self.query_tokens[None] + self.project(pooled)[:, None]
        for stage in self.stages:
            x = stage(x)
        return x


@pytest.fixture
def odd_model():
    register_vision_backend("stripe", StripeTower)
    register_connector("query_stack", QueryStack)
    try:
        preset = get_preset("idefics2-tiny")
        config = dataclasses.replace(
            preset,
            vision=dataclasses.replace(preset.vision, backend="stripe"),
            connector=ConnectorConfig(type="query_stack"),
        )
        torch.manual_seed(0)
        yield VisionLanguageModel(config)
    finally:
        del VISION_BACKENDS["stripe"], CONNECTORS["query_stack"]


def batch(model: VisionLanguageModel) -> dict[str, Tensor]:
    image = [model.image_token_id] * QUERIES
    input_ids = torch.tensor([[1, 5, *image, 7, 8, 9, 10]])
    return {"input_ids": input_ids, "labels": input_ids, "pixel_values": torch.randn(1, 1, 3, 32, 32)}


def test_registered_tower_and_connector_get_adapters_fsdp_units_and_decay_as_declared(odd_model, tmp_path):
    model = odd_model
    assert (
        visual_tokens_per_tile(model.config)
        == QUERIES
        == model.encode_images(torch.randn(1, 3, 32, 32)).shape[1]
    )
    policy = TrainingPolicy(vision_tower="lora", connector="full", language_model="frozen")
    apply_policy(model, policy)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    adapted = {name.split(".lora_")[0] for name in trainable if name.startswith("vision_tower.")}
    assert adapted == {f"vision_tower.encoder.{i}.{layer}" for i in range(len(model.vision_tower.encoder))
                       for layer in ("mix", "ffn")}  # fmt: skip
    connector = {f"connector.{name}" for name, _ in model.connector.named_parameters()}
    assert trainable == connector | {n for n in trainable if n.startswith("vision_tower.") and ".lora_" in n}
    skip_decay = no_weight_decay(model)
    assert "connector.query_tokens" in skip_decay and "connector.project.weight" not in skip_decay
    groups = {group["name"]: {id(p) for p in group["params"]} for group in param_groups(model, 1e-3, 0.1)}
    assert id(model.connector.query_tokens) in groups["connector/no_decay"]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        checkpoint_blocks(model)
        shard(model, init_device_mesh("cpu", (1,)))
        declared = [*model.vision_tower.encoder, *model.connector.stages]
        assert all(isinstance(block, FSDPModule) for block in declared)
        head_before = model.vision_tower.head.weight.full_tensor().clone()
        lora_before = model.vision_tower.encoder[0].mix.lora_B["default"].weight.full_tensor().clone()
        optimizer = torch.optim.AdamW(param_groups(model, 1e-2, 0.1))
        model(**batch(model)).loss.backward()
        optimizer.step()
        assert torch.equal(model.vision_tower.head.weight.full_tensor(), head_before)
        assert not torch.equal(
            model.vision_tower.encoder[0].mix.lora_B["default"].weight.full_tensor(), lora_before
        )
    finally:
        dist.destroy_process_group()


def test_unknown_names_list_the_registered_ones():
    preset = get_preset("idefics2-tiny")
    with pytest.raises(ValueError, match=r"Unknown vision\.backend 'nope'.*register_vision_backend"):
        VisionLanguageModel(
            dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, backend="nope"))
        )
    with pytest.raises(ValueError, match=r"Unknown connector\.type 'nope'.*register_connector"):
        VisionLanguageModel(dataclasses.replace(preset, connector=ConnectorConfig(type="nope")))
    with pytest.raises(ValueError, match="already registered"):
        register_connector("perceiver", QueryStack)
