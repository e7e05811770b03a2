"""NEFTune: uniform noise on the language model's input embeddings during training (Jain et al., 2023).

Idefics2 §4.2 and Idefics3 §5.2.1 fine-tune with it. The noise is added by a forward hook on the
language model's input embedding layer (``pl_module.model.language_model.get_input_embeddings()``),
as transformers' ``neftune_post_forward_hook`` does, with the same formula: ``U(-1, 1) * alpha /
sqrt(L * d)``, ``L`` the (padded) sequence length of the batch and ``d`` the hidden size.

In ``VisionLanguageModel`` the image features replace the ``<image>`` rows *after* the embedding
lookup (``masked_scatter``), so with autoregressive fusion only text tokens (and the image
boundary/tile-tag tokens) are noised, as in Idefics; with cross-attention fusion the ``<image>``
marker embeddings are noised too (the visual tokens never pass through the embedding layer).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def neftune_noise(embeddings: Tensor, noise_alpha: float) -> Tensor:
    """``embeddings`` (batch, L, d) plus NEFTune noise; the exact arithmetic and RNG use of transformers'
    ``neftune_post_forward_hook`` (a float32 magnitude, one ``uniform_`` draw), so both give the same
    tensor from the same seed."""
    dims = torch.tensor(embeddings.size(1) * embeddings.size(2))
    magnitude = noise_alpha / torch.sqrt(dims)
    return embeddings + torch.zeros_like(embeddings).uniform_(-magnitude, magnitude)


class NEFTune(Callback):
    """Noisy embeddings for fine-tuning; ``noise_alpha`` is the paper's alpha (5 in its experiments).

    Active only while the trainer is in its training stage with gradients enabled: validation,
    sanity checks and ``generate`` (``no_grad``) see clean embeddings. The hook is registered in
    ``on_fit_start`` (the model exists once ``configure_model`` has run) and removed at the end of
    fit, or on an exception.
    """

    def __init__(self, noise_alpha: float = 5.0) -> None:
        if noise_alpha <= 0:
            raise ValueError(f"noise_alpha must be positive; got {noise_alpha}.")
        self.noise_alpha = noise_alpha
        self._handle: RemovableHandle | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        embedding = pl_module.model.language_model.get_input_embeddings()

        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            if trainer.training and torch.is_grad_enabled():
                return neftune_noise(output, self.noise_alpha)
            return output

        self._remove()
        self._handle = embedding.register_forward_hook(hook)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
