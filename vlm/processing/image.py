"""Image side of the processor: decoding, RGB conversion, Idefics2/Idefics3 resizing and splitting.

``ImageProcessor`` gives what transformers' ``Idefics2ImageProcessorPil`` / ``Idefics3ImageProcessorPil``
give for the same settings (bit-identical resized pixels, normalised values within one float32
rounding), several times faster: every size is computed up front from the image size
(``vlm.processing.resize``), the same PIL resizes run on PIL images (no numpy round trips, no float64),
and each resized piece is cut into tiles and normalised in place, straight in a preallocated batch
tensor (no padding copies). Training-time options the reference lacks are off by default.
"""

from __future__ import annotations

import io
import itertools
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from vlm.config import Recipe
from vlm.processing.resize import (
    fit_in_tile,
    idefics2_crop_boxes,
    idefics2_size,
    idefics3_size,
    tile_grid_size,
)

# PIL's own decompression-bomb limit (it refuses more than 2 * ``Image.MAX_IMAGE_PIXELS`` at open).
MAX_PIXELS = 178_956_970
IMAGENET_STANDARD = (0.5, 0.5, 0.5)

_RECIPE_RESAMPLE = {"idefics2": Image.Resampling.BILINEAR, "idefics3": Image.Resampling.LANCZOS}


def load_image(source: bytes | str | os.PathLike | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image from bytes or a file path, EXIF orientation applied; a PIL image is returned as is.

    Raises ``ValueError`` naming the source when it is not a readable image (empty, corrupt or
    truncated data) or when its header announces more than ``max_pixels`` pixels: that is checked
    before decoding, so a decompression bomb costs nothing. (Above ``MAX_PIXELS`` PIL already refuses
    the header; that is reported the same way.)
    """
    if isinstance(source, Image.Image):
        return source
    name = f"<{len(source)} bytes>" if isinstance(source, bytes) else repr(os.fspath(source))
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as error:  # unidentified format, decompression bomb, or a header PIL chokes on
        raise ValueError(f"{name} is not a readable image: {error!r}") from error
    with image:
        if image.width * image.height > max_pixels:
            raise ValueError(
                f"{name} is not a readable image: its header says {image.width}x{image.height} pixels, "
                f"more than max_pixels={max_pixels} (a decompression bomb?); it was not decoded."
            )
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError... on bad data
            raise ValueError(f"{name} is not a readable image: {error}") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``, exactly as transformers' ``convert_to_rgb``: anything with an alpha
    band or a ``transparency`` entry is composited on white; other modes use PIL's conversion
    (16/32-bit integer modes saturate at 255, as there). An RGB image is returned as is."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageLayout:
    """How one image was cut: ``rows`` x ``cols`` is the Idefics3 tile grid as transformers reports it
    (0, 0 when the image is a single tile, and always for Idefics2, whose crops are not a tagged
    grid); ``n_tiles`` is its number of tiles in ``pixel_values``: grid + global image for a split
    Idefics3 image, 4 crops + the whole image for a split Idefics2 image, else 1."""

    rows: int
    cols: int
    n_tiles: int


@dataclass(frozen=True)
class _Piece:
    """One resize of a plan, of the (staged) image or of a crop ``box`` of it, cut into a ``grid`` of
    equal tiles."""

    size: tuple[int, int]
    box: tuple[int, int, int, int] | None = None
    grid: tuple[int, int] = (1, 1)

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.size[0] // self.grid[0], self.size[1] // self.grid[1]


@dataclass(frozen=True)
class _Plan:
    """What happens to one image, decided from its size alone (so the batch can be preallocated):
    successive resizes of the whole image (``stages``), then the ``pieces`` that become its tiles."""

    layout: ImageLayout
    stages: tuple[tuple[int, int], ...]
    pieces: tuple[_Piece, ...]


@dataclass
class ProcessedImages:
    """A processed batch: all tiles of all samples in one flat tensor, in sample and reading order.

    ``pixel_values`` (n_tiles, 3, H, W) float32 and ``pixel_attention_mask`` (n_tiles, H, W) bool are
    zero-padded at the bottom/right to the largest tile (no padding tiles); sample i owns the next
    ``tiles_per_sample[i]`` tiles, and ``layouts[i]`` says how each of its images was cut.
    """

    pixel_values: Tensor
    pixel_attention_mask: Tensor
    tiles_per_sample: list[int]
    layouts: list[list[ImageLayout]]

    def to_transformers(self) -> tuple[Tensor, Tensor]:
        """The transformers layout: (batch, max_tiles, 3, H, W) pixel values and an int64 (batch,
        max_tiles, H, W) mask, samples with fewer tiles padded with all-zero images."""
        batch, most = len(self.tiles_per_sample), max(self.tiles_per_sample, default=0)
        real = torch.arange(most)[None, :] < torch.tensor(self.tiles_per_sample, dtype=torch.long)[:, None]
        pixel_values = self.pixel_values.new_zeros(batch, most, *self.pixel_values.shape[1:])
        mask = torch.zeros(batch, most, *self.pixel_attention_mask.shape[1:], dtype=torch.int64)
        pixel_values[real] = self.pixel_values
        mask[real] = self.pixel_attention_mask.long()
        return pixel_values, mask


@dataclass
class ImageProcessor:
    """Idefics2/Idefics3 image processing; the defaults are transformers' (``None`` = the recipe's).

    - ``idefics2``: the longest side down to ``longest_edge`` (980, aspect kept), then each side up
      to ``shortest_edge`` (378); ``do_image_splitting`` (off) adds 4 crops before the whole image,
      each resized by the same rule. BILINEAR.
    - ``idefics3``: longest side to ``longest_edge`` (4 * ``tile_size``), then with
      ``do_image_splitting`` (on) a grid of ``tile_size`` (364) tiles plus a global image squeezed to
      one tile; without splitting, the image squeezed to one tile. LANCZOS.
    - Normalisation: ``(x * rescale_factor - image_mean) / image_std``; ``do_convert_rgb`` as
      ``to_rgb`` (when off, images must already be RGB).

    ``longest_edge`` is the maximum resolution and may be changed between steps (resolution
    ramp-up). Training-time options, off by default:

    - ``upscale_small_images=False``: never enlarge an image. Idefics2 raises a side to at most
      its own length; Idefics3 keeps an image whose longest side fits ``longest_edge``, rounds each
      side *down* to whole tiles (a side shorter than a tile stays, its tiles are padded) and never
      enlarges the global image. A 386x386 image becomes one 364x364 tile instead of 16 + 1.
    - ``max_tiles_per_sample``: a sample over budget gets lower resolutions, by whole tiles
      (Idefics3: ``longest_edge`` minus 1, 2, ... tiles), or is not split (Idefics2, whose tile
      count does not depend on resolution); ``ValueError`` if one tile per image does not fit.
      Image tokens are tiles times the model's tokens per tile.
    - ``split_fraction``: with ``training=True``, each sample is split with this probability instead
      of following ``do_image_splitting`` (Idefics2 §3.4: half of the samples).
    - ``random_upscale=(low, high)``: with ``training=True``, each sample's ``longest_edge`` is
      scaled by a factor drawn uniformly in that range (Idefics2 §4.2, random up-scaling).
    - ``num_threads``: images are processed in a pool of threads (PIL and numpy release the GIL);
      for inference or a main-process loader. Keep 1 in DataLoader workers.
    """

    recipe: Recipe = "idefics3"
    longest_edge: int | None = None
    shortest_edge: int = 378
    tile_size: int = 364
    do_image_splitting: bool | None = None
    resample: int | None = None
    image_mean: tuple[float, ...] = IMAGENET_STANDARD
    image_std: tuple[float, ...] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255
    do_convert_rgb: bool = True
    upscale_small_images: bool = True
    max_tiles_per_sample: int | None = None
    split_fraction: float | None = None
    random_upscale: tuple[float, float] | None = None
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.recipe not in _RECIPE_RESAMPLE:
            raise ValueError(f"Unknown recipe {self.recipe!r}; choose 'idefics2' or 'idefics3'.")
        idefics3 = self.recipe == "idefics3"
        if self.longest_edge is None:
            self.longest_edge = 4 * self.tile_size if idefics3 else 980
        if self.do_image_splitting is None:
            self.do_image_splitting = idefics3
        if self.resample is None:
            self.resample = _RECIPE_RESAMPLE[self.recipe]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel.")
        if self.split_fraction is not None and not 0 <= self.split_fraction <= 1:
            raise ValueError(f"split_fraction must be in [0, 1], got {self.split_fraction}.")
        if self.random_upscale is not None and not 0 < self.random_upscale[0] <= self.random_upscale[1]:
            raise ValueError(
                f"random_upscale must be (low, high) with 0 < low <= high, got {self.random_upscale}."
            )
        if self.max_tiles_per_sample is not None and self.max_tiles_per_sample < 1:
            raise ValueError(f"max_tiles_per_sample must be >= 1, got {self.max_tiles_per_sample}.")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data; ``from_dict`` rebuilds an equal processor (what
        ``VLMProcessor.save_pretrained`` writes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> ImageProcessor:
        """The processor of ``to_dict``'s settings (JSON lists turned back into tuples)."""
        tuples = {
            name: tuple(settings[name])
            for name in ("image_mean", "image_std", "random_upscale")
            if settings.get(name) is not None
        }
        return cls(**{**settings, **tuples})

    @classmethod
    def from_transformers(cls, image_processor: Any) -> ImageProcessor:
        """Settings of a transformers Idefics2 or Idefics3/SmolVLM image processor (PIL or torchvision)."""
        hf = image_processor
        if not (hf.do_resize and hf.do_rescale and hf.do_normalize and hf.do_pad):
            raise ValueError("Only do_resize, do_rescale, do_normalize and do_pad all on are supported.")
        common = dict(
            longest_edge=hf.size["longest_edge"],
            do_image_splitting=hf.do_image_splitting,
            resample=int(hf.resample),
            image_mean=tuple(hf.image_mean),
            image_std=tuple(hf.image_std),
            rescale_factor=hf.rescale_factor,
            do_convert_rgb=hf.do_convert_rgb,
        )
        if hasattr(hf, "max_image_size"):
            return cls(recipe="idefics3", tile_size=hf.max_image_size["longest_edge"], **common)
        return cls(recipe="idefics2", shortest_edge=hf.size["shortest_edge"], **common)

    def __call__(
        self,
        images: Sequence[Sequence[Image.Image]],
        training: bool = False,
        rng: random.Random | None = None,
    ) -> ProcessedImages:
        """Process a batch; ``images[i]`` are sample i's images in reading order (maybe none).

        ``training`` turns ``split_fraction`` and ``random_upscale`` on; their draws come from ``rng``
        (one split draw, then one scale draw, per sample; an unseeded generator when None).
        """
        rng = random.Random() if rng is None else rng
        plans = [self._plan_sample(index, sample, training, rng) for index, sample in enumerate(images)]
        jobs = [(image, plan) for sample, plans_ in zip(images, plans) for image, plan in zip(sample, plans_)]
        shapes = [piece.tile_shape for _, plan in jobs for piece in plan.pieces]
        height, width = max((h for h, _ in shapes), default=0), max((w for _, w in shapes), default=0)
        if self.recipe == "idefics3" and shapes:
            # Every Idefics3 tile yields the model's fixed token count only at the full tile size
            # (pixel shuffle of a tile_size grid); smaller tiles (upscale_small_images=False) are padded.
            height, width = max(height, self.tile_size), max(width, self.tile_size)
        counts = [plan.layout.n_tiles for _, plan in jobs]
        pixel_values = torch.empty(sum(counts), 3, height, width)
        mask = torch.zeros(sum(counts), height, width, dtype=torch.bool)
        # (x * rescale_factor - mean) / std as x * scale + offset.
        scale = torch.tensor([self.rescale_factor / std for std in self.image_std]).view(3, 1, 1)
        offset = torch.tensor([-mean / std for mean, std in zip(self.image_mean, self.image_std)]).view(
            3, 1, 1
        )
        calls = [
            partial(self._write, image, plan, pixel_values[at : at + n], mask[at : at + n], scale, offset)
            for (image, plan), at, n in zip(jobs, itertools.accumulate([0, *counts]), counts)
        ]
        if self.num_threads > 1 and len(calls) > 1:
            with ThreadPoolExecutor(min(self.num_threads, len(calls))) as pool:
                list(pool.map(lambda call: call(), calls))
        else:
            for call in calls:
                call()
        return ProcessedImages(
            pixel_values,
            mask,
            [sum(plan.layout.n_tiles for plan in plans_) for plans_ in plans],
            [[plan.layout for plan in plans_] for plans_ in plans],
        )

    def _plan_sample(
        self, index: int, images: Sequence[Image.Image], training: bool, rng: random.Random
    ) -> list[_Plan]:
        """Plans of one sample's images: training-time draws, then the tile budget."""
        split, longest_edge = self.do_image_splitting, self.longest_edge
        if training and self.split_fraction is not None:
            split = rng.random() < self.split_fraction
        if training and self.random_upscale is not None:
            longest_edge = max(1, round(longest_edge * rng.uniform(*self.random_upscale)))
        sizes = [_image_size(image) for image in images]
        budget = self.max_tiles_per_sample
        settings = [(split, longest_edge)]
        if budget is not None and split and self.recipe == "idefics3":
            settings += [(True, edge) for edge in range(longest_edge - self.tile_size, 0, -self.tile_size)]
        elif budget is not None and split:
            settings.append((False, longest_edge))
        for split, longest_edge in settings:
            plans = [self._plan(height, width, split, longest_edge) for height, width in sizes]
            if budget is None or sum(plan.layout.n_tiles for plan in plans) <= budget:
                return plans
        raise ValueError(
            f"Sample {index} has {len(images)} images: even at one tile each they exceed "
            f"max_tiles_per_sample={budget}."
        )

    def _plan(self, height: int, width: int, split: bool, longest_edge: int) -> _Plan:
        """Plan of one image of size (height, width) (the reference's sequence of resizes and crops)."""
        upscale = self.upscale_small_images
        if self.recipe == "idefics2":
            size = partial(
                idefics2_size, shortest_edge=self.shortest_edge, longest_edge=longest_edge, upscale=upscale
            )
            boxes = idefics2_crop_boxes(height, width) if split else []
            pieces = [
                _Piece(size(bottom - top, right - left), (left, top, right, bottom))
                for left, top, right, bottom in boxes
            ]
            pieces.append(_Piece(size(height, width)))
            return _Plan(ImageLayout(0, 0, len(pieces)), (), tuple(pieces))
        tile = self.tile_size
        first = idefics3_size(height, width, longest_edge, upscale)
        if not split:
            return _Plan(ImageLayout(0, 0, 1), (first,), (_Piece(fit_in_tile(*first, tile, upscale)),))
        grid = tile_grid_size(*first, tile, upscale)
        if grid[0] <= tile and grid[1] <= tile:
            return _Plan(ImageLayout(0, 0, 1), (first, grid), (_Piece(grid),))
        rows, cols = -(-grid[0] // tile), -(-grid[1] // tile)
        pieces = (_Piece(grid, grid=(rows, cols)), _Piece(fit_in_tile(*grid, tile, upscale)))
        return _Plan(ImageLayout(rows, cols, rows * cols + 1), (first, grid), pieces)

    def _write(
        self,
        image: Image.Image,
        plan: _Plan,
        pixel_values: Tensor,
        mask: Tensor,
        scale: Tensor,
        offset: Tensor,
    ) -> None:
        """Run one image's plan, writing its normalised tiles into its slices of the batch tensors."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"do_convert_rgb is off but an image is in mode {image.mode!r}, not RGB.")
        for size in plan.stages:
            image = _resize(image, size, self.resample)
        first = 0
        for piece in plan.pieces:
            source = image if piece.box is None else image.crop(piece.box)
            # np.array, not asarray: torch takes only writable arrays (the copy costs ~1/10 of the rest).
            pixels = torch.from_numpy(np.array(_resize(source, piece.size, self.resample)))
            (rows, cols), (height, width) = piece.grid, piece.tile_shape
            count = rows * cols
            tiles = pixel_values[first : first + count]
            target = tiles[:, :, :height, :width]
            # (rows*h, cols*w, 3) uint8 -> (rows*cols, 3, h, w) float32, normalised in place.
            target.unflatten(0, (rows, cols)).copy_(
                pixels.view(rows, height, cols, width, 3).permute(0, 2, 4, 1, 3)
            )
            target.mul_(scale).add_(offset)
            tiles[:, :, height:].zero_()
            tiles[:, :, :height, width:].zero_()
            mask[first : first + count, :height, :width] = True
            first += count


def _image_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of an input image, checked."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"Images must be PIL images (see load_image), got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"Cannot process an empty image of size {image.width}x{image.height}.")
    return image.height, image.width


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """``image`` resized to (height, width) with PIL, as transformers does (it gets a copy when the
    size is unchanged; here the image itself)."""
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), resample)
