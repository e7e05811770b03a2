"""Output sizes of the Idefics2/Idefics3 image processors, computed from an image's size alone.

Each function mirrors transformers' released code expression by expression, float aspect ratios
and ``int()`` truncations included: exact integer arithmetic gives other sizes (a 28x25 image gets
height 1299 in transformers, 1300 exactly), and the sizes decide every pixel. Sizes are
``(height, width)``. ``upscale=False`` is this project's training-time option that never makes an
image (or, for Idefics2, a side) larger than it is; ``upscale=True`` is transformers' behaviour.
"""

from __future__ import annotations

import math

# transformers' Idefics3 MAX_IMAGE_SIZE: no side exceeds 4096 after the first resize.
MAX_IMAGE_SIZE = 4096


def _shrink_longest_side(height: int, width: int, max_len: int) -> tuple[int, int]:
    """The longest side down to ``max_len``, the other by the aspect ratio truncated to an int (the
    shared step of transformers' Idefics2 resize and Idefics3 ``scale_below_upper_bound``)."""
    aspect_ratio = width / height if height else math.inf
    if width >= height and width > max_len:
        return int(max_len / aspect_ratio), max_len
    if height > width and height > max_len:
        return max_len, int(max_len * aspect_ratio)
    return height, width


def idefics2_size(
    height: int, width: int, shortest_edge: int, longest_edge: int, upscale: bool = True
) -> tuple[int, int]:
    """Idefics2 resize: the longest side down to ``longest_edge`` (aspect ratio kept), then each side
    independently up to ``shortest_edge`` (transformers' ``get_resize_output_image_size``, which
    distorts thin images). Without ``upscale`` a side is raised to at most its own length.

    An empty crop (see ``idefics2_crop_boxes``) gets a size too: transformers' for a 0 width, and
    the same rule for a 0 height, where transformers divides by zero.
    """
    new_height, new_width = _shrink_longest_side(height, width, longest_edge)
    if not upscale:
        return max(new_height, min(shortest_edge, height), 1), max(new_width, min(shortest_edge, width), 1)
    return max(new_height, shortest_edge), max(new_width, shortest_edge)


def idefics2_crop_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The 4 crops of Idefics2 image splitting as PIL boxes (left, top, right, bottom), cut at
    ``side // 2`` in transformers' order (top-left, top-right, bottom-left, bottom-right).

    A 1-pixel side cannot be halved: its first half is empty and resizes to a black crop, as in
    transformers for a 1-pixel width (for a 1-pixel height transformers divides by zero).
    """
    middle_y, middle_x = height // 2, width // 2
    return [
        (0, 0, middle_x, middle_y),
        (middle_x, 0, width, middle_y),
        (0, middle_y, middle_x, height),
        (middle_x, middle_y, width, height),
    ]


def idefics3_size(height: int, width: int, longest_edge: int, upscale: bool = True) -> tuple[int, int]:
    """Idefics3 first resize: the longest side to ``longest_edge``, up or down, the other side by the
    aspect ratio rounded up to even, then both below ``MAX_IMAGE_SIZE`` (transformers'
    ``_resize_output_size_rescale_to_max_len`` then ``_resize_output_size_scale_below_upper_bound``).
    Without ``upscale`` an image whose longest side fits is kept as it is."""
    if upscale or max(height, width) > longest_edge:
        aspect_ratio = width / height
        if width >= height:
            width = longest_edge
            height = int(width / aspect_ratio)
            height += height % 2
        else:
            height = longest_edge
            width = int(height * aspect_ratio)
            width += width % 2
        height, width = max(height, 1), max(width, 1)
    height, width = _shrink_longest_side(height, width, MAX_IMAGE_SIZE)
    return max(height, 1), max(width, 1)


def tile_grid_size(height: int, width: int, tile: int, upscale: bool = True) -> tuple[int, int]:
    """Size an Idefics3 image is resized to before being cut into ``tile`` x ``tile`` tiles
    (transformers' ``resize_for_vision_encoder``): the longest side rounded up to a multiple of
    ``tile``, the other side derived from the aspect ratio and rounded up as well.

    Without ``upscale`` each side is rounded down instead, and a side shorter than a tile is kept.
    """
    if not upscale:
        return (
            height if height < tile else height // tile * tile,
            width if width < tile else width // tile * tile,
        )
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    # transformers gets a side of 0 (and fails) when int() truncates a 1-pixel side to 0.
    return max(height, tile), max(width, tile)


def fit_in_tile(height: int, width: int, tile: int, upscale: bool = True) -> tuple[int, int]:
    """Size of an Idefics3 image resized to one tile: the global image after splitting, or the whole
    image without splitting. transformers squeezes it to ``tile`` x ``tile``; without ``upscale`` a
    side shorter than a tile is kept."""
    return (tile, tile) if upscale else (min(height, tile), min(width, tile))
