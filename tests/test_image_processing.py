"""Image processing: parity with transformers' PIL image processors, training-time options, decoding."""

import io
import random
import struct
import zlib
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics2ImageProcessorPil, Idefics3ImageProcessorPil

from vlm.processing.image import ImageLayout, ImageProcessor, load_image, to_rgb

REFERENCES = {"idefics2": Idefics2ImageProcessorPil, "idefics3": Idefics3ImageProcessorPil}

# (width, height). Thin, tiny, tile-sized and tile-plus-one, huge, and 28x25, where exact integer
# arithmetic would give another height (1300) than transformers' float expressions (1299).
SIZES = [
    (1, 1000), (1000, 1), (1, 700), (17, 23), (364, 364), (365, 364), (980, 980), (4000, 3000),
    (3000, 4000), (728, 364), (1, 1), (2, 2), (378, 378), (500, 300), (386, 386), (1456, 1456),
    (2000, 500), (13, 7000), (1, 3000), (28, 25), (25, 28), (1457, 3),
]  # fmt: skip
MODES = ["L", "LA", "RGBA", "P", "P+transparency", "RGB+transparency", "CMYK", "YCbCr", "I;16", "I", "F", "1"]


@cache
def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Uniform noise (the hardest case for resampling) of the given size, in the given mode."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 600, (height, width), dtype=np.uint16))  # saturates above 255
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 400, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(128, 80, (height, width)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3
        return image
    if mode == "RGB+transparency":
        image = rgba.convert("RGB").quantize(8).convert("RGB")  # few colours, so the key colour occurs
        image.info["transparency"] = image.getpixel((0, 0))
        return image
    return rgba.convert(mode)


def _assert_parity(recipe: str, batch: list[list[Image.Image]], **settings) -> None:
    """Our output equals the transformers PIL processor's with the same settings."""
    reference = REFERENCES[recipe](**settings)
    extra = {"return_row_col_info": True} if recipe == "idefics3" else {}
    expected = reference(batch, return_tensors="pt", **extra)
    ours = ImageProcessor.from_transformers(reference)(batch)
    pixel_values, mask = ours.to_transformers()
    assert pixel_values.shape == expected["pixel_values"].shape
    assert (pixel_values - expected["pixel_values"]).abs().max() <= 1e-5
    assert torch.equal(mask, expected["pixel_attention_mask"])
    if recipe == "idefics3":
        assert [[(layout.rows, layout.cols) for layout in sample] for sample in ours.layouts] == [
            list(zip(rows, cols)) for rows, cols in zip(expected["rows"], expected["cols"])
        ]


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_defaults_are_transformers_defaults(recipe):
    assert ImageProcessor(recipe=recipe) == ImageProcessor.from_transformers(REFERENCES[recipe]())


# transformers fails to split 1-pixel-high images with Idefics2: test_idefics2_split_of_one_pixel_high_image.
SIZE_CASES = [
    pytest.param(size, recipe, split, id=f"{size[0]}x{size[1]}-{recipe}-{'split' if split else 'whole'}")
    for size in SIZES
    for recipe in ["idefics2", "idefics3"]
    for split in [False, True]
    if not (recipe == "idefics2" and split and size[1] == 1)
]


@pytest.mark.parametrize(("size", "recipe", "split"), SIZE_CASES)
def test_parity_sizes(size, recipe, split):
    _assert_parity(recipe, [[_image(*size)]], do_image_splitting=split)


@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
@pytest.mark.parametrize("mode", MODES)
def test_parity_modes(mode, recipe):
    _assert_parity(recipe, [[_image(53, 37, mode)]])


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("recipe", ["idefics2", "idefics3"])
def test_parity_batches(recipe, split):
    batch = [
        [_image(500, 300), _image(40, 90, "L")],
        [],
        [_image(17, 23, "RGBA"), _image(400, 600, seed=1), _image(365, 364, "P")],
        [_image(1, 700)],
    ]
    _assert_parity(recipe, batch, do_image_splitting=split)


def test_parity_custom_settings():
    clip_mean, clip_std = [0.481, 0.458, 0.408], [0.269, 0.261, 0.276]
    batch = [[_image(500, 300), _image(100, 900)], [_image(60, 40, "LA")]]
    _assert_parity(
        "idefics3", batch, size={"longest_edge": 728}, max_image_size={"longest_edge": 182},
        resample=Image.Resampling.BICUBIC, image_mean=clip_mean, image_std=clip_std,
    )  # fmt: skip
    _assert_parity(
        "idefics2", batch, size={"shortest_edge": 100, "longest_edge": 400}, do_image_splitting=True,
        resample=Image.Resampling.BICUBIC, image_mean=clip_mean, image_std=clip_std,
    )  # fmt: skip


def test_idefics2_split_of_one_pixel_high_image():
    image = _image(700, 1)
    with pytest.raises(ZeroDivisionError):
        Idefics2ImageProcessorPil(do_image_splitting=True)([[image]], return_tensors="pt")
    out = ImageProcessor(recipe="idefics2", do_image_splitting=True)([[image]])
    # Top crops are empty, hence black (as transformers does for a 1-pixel width); the rest is real.
    assert out.tiles_per_sample == [5] and out.pixel_values.shape == (5, 3, 378, 700)
    assert (out.pixel_values[:2, :, :, :378] == -1).all()
    whole = ImageProcessor(recipe="idefics2")([[image]]).pixel_values[0]
    assert torch.equal(out.pixel_values[4], whole)


def test_idefics3_thin_image_whose_width_truncates_to_zero():
    # 1x3000 -> 196x1 -> grid height 196, width int(196 * (1 / 196)) = int(0.99...) = 0 in transformers.
    reference = Idefics3ImageProcessorPil(size={"longest_edge": 196}, max_image_size={"longest_edge": 49})
    image = _image(1, 3000)
    with pytest.raises(ValueError, match="size must be"):
        reference([[image]], return_tensors="pt")
    out = ImageProcessor.from_transformers(reference)([[image]])
    assert out.layouts == [[ImageLayout(4, 1, 5)]] and out.pixel_values.shape == (5, 3, 49, 49)


def test_flat_output_has_only_real_tiles():
    batch = [[_image(500, 300), _image(30, 20)], [], [_image(600, 600, "L")]]
    for recipe in ["idefics2", "idefics3"]:
        out = ImageProcessor(recipe=recipe, do_image_splitting=True)(batch)
        n_tiles = out.pixel_values.shape[0]
        assert sum(out.tiles_per_sample) == n_tiles == out.pixel_attention_mask.shape[0]
        assert [sum(layout.n_tiles for layout in sample) for sample in out.layouts] == out.tiles_per_sample
        assert out.pixel_attention_mask.flatten(1).any(1).all()
        assert (out.pixel_values.flatten(1) != 0).any(1).all()
        assert (out.pixel_values * ~out.pixel_attention_mask[:, None]).eq(0).all()
        assert out.pixel_values.dtype == torch.float32 and out.pixel_attention_mask.dtype == torch.bool


def test_batch_without_images():
    out = ImageProcessor()([[], []])
    assert out.pixel_values.shape == (0, 3, 0, 0) and out.tiles_per_sample == [0, 0]
    assert out.to_transformers()[0].shape == (2, 0, 3, 0, 0)


def test_threads_give_the_same_output():
    batch = [[_image(500, 300), _image(40, 90)], [_image(1000, 1000, seed=2)]]
    one, two = ImageProcessor()(batch), ImageProcessor(num_threads=2)(batch)
    assert torch.equal(one.pixel_values, two.pixel_values)
    assert torch.equal(one.pixel_attention_mask, two.pixel_attention_mask) and one.layouts == two.layouts


def test_longest_edge_can_change_between_calls():
    processor = ImageProcessor()
    processor.longest_edge = 728  # what a resolution ramp-up callback does
    assert processor([[_image(1000, 1000)]]).layouts == [[ImageLayout(2, 2, 5)]]


def test_no_upscaling_idefics3():
    processor = ImageProcessor(upscale_small_images=False)
    assert ImageProcessor()([[_image(386, 386)]]).layouts == [[ImageLayout(4, 4, 17)]]
    out = processor([[_image(386, 386)], [_image(100, 80)], [_image(200, 1000)], [_image(2000, 800)]])
    # 386 -> one 364 tile; 100x80 kept as is (padded); 200 wide: 2 rows of 364x200 + a 364x200
    # global image; 2000x800 -> 1456x582 -> 1456x364: 1 row of 4 tiles + global (transformers: 2x4).
    assert [layout for sample in out.layouts for layout in sample] == [
        ImageLayout(0, 0, 1), ImageLayout(0, 0, 1), ImageLayout(2, 1, 3), ImageLayout(1, 4, 5)
    ]  # fmt: skip
    real = out.pixel_attention_mask
    assert real[0].all() and real[1].sum() == 100 * 80 and (real[2:5].sum((1, 2)) == 364 * 200).all()
    expected = torch.from_numpy(np.array(_image(100, 80))).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(out.pixel_values[1, :, :80, :100], expected, atol=1e-6)


def test_no_upscaling_never_enlarges():
    sizes = [(1, 1000), (17, 23), (386, 386), (500, 300), (700, 1), (1500, 400)]
    for recipe in ["idefics2", "idefics3"]:
        processor = ImageProcessor(recipe=recipe, do_image_splitting=True, upscale_small_images=False)
        out = processor([[_image(*size)] for size in sizes])
        first = 0
        for (width, height), n in zip(sizes, out.tiles_per_sample):
            mask = out.pixel_attention_mask[first : first + n]
            assert mask.any(2).sum(1).max() <= height and mask.any(1).sum(1).max() <= width
            first += n
    idefics2 = ImageProcessor(recipe="idefics2", upscale_small_images=False)([[_image(100, 80)]])
    assert idefics2.pixel_values.shape == (1, 3, 80, 100)  # transformers: 378x378


def test_tile_budget_lowers_resolution_by_whole_tiles():
    image = _image(2000, 1500)  # 4x3 grid + global = 13 tiles at 1456
    out = ImageProcessor(max_tiles_per_sample=10)([[image], [_image(1000, 300)]])
    assert out.layouts == [[ImageLayout(3, 3, 10)], [ImageLayout(2, 4, 9)]]  # 1092 = 1456 - one tile
    same = ImageProcessor(longest_edge=1092)([[image]])
    assert torch.equal(out.pixel_values[:10], same.pixel_values)
    assert ImageProcessor(max_tiles_per_sample=3)([[image, image]]).layouts == [[ImageLayout(0, 0, 1)] * 2]
    with pytest.raises(ValueError, match="max_tiles_per_sample=2"):
        ImageProcessor(max_tiles_per_sample=2)([[_image(20, 20)] * 3])


def test_tile_budget_idefics2_drops_splitting():
    processor = ImageProcessor(recipe="idefics2", do_image_splitting=True, max_tiles_per_sample=5)
    assert processor([[_image(50, 40)] * 2]).tiles_per_sample == [2]
    assert processor([[_image(50, 40)]]).tiles_per_sample == [5]


def test_split_fraction_is_reproducible():
    processor = ImageProcessor(recipe="idefics2", shortest_edge=8, longest_edge=16, split_fraction=0.5)
    batch = [[_image(10, 10)] for _ in range(40)]

    def layouts(seed):
        out = processor(batch, training=True, rng=random.Random(seed))
        return [sample[0].n_tiles for sample in out.layouts]

    assert layouts(0) == layouts(0) != layouts(1)
    assert set(layouts(0)) == {1, 5} and 10 <= layouts(0).count(5) <= 30
    assert processor(batch).tiles_per_sample == [1] * 40  # not in training: do_image_splitting (off)


def test_random_upscale_is_bounded_and_reproducible():
    processor = ImageProcessor(
        recipe="idefics2", shortest_edge=8, longest_edge=100, random_upscale=(0.5, 1.0)
    )
    batch = [[_image(200, 200)] for _ in range(20)]

    def sides(seed=None, training=True):
        rng = None if seed is None else random.Random(seed)
        return processor(batch, training=training, rng=rng).pixel_attention_mask.sum(2).amax(1).tolist()

    assert sides(0) == sides(0) != sides(1)
    assert all(50 <= side <= 100 for side in sides(0)) and len(set(sides(0))) > 5
    assert sides(training=False) == [100] * 20


def test_invalid_inputs():
    with pytest.raises(ValueError, match="mode 'L'"):
        ImageProcessor(do_convert_rgb=False)([[_image(20, 20, "L")]])
    with pytest.raises(TypeError, match="PIL images"):
        ImageProcessor()([[b"bytes"]])
    with pytest.raises(ValueError, match="split_fraction"):
        ImageProcessor(split_fraction=2.0)


def test_to_rgb_composites_alpha_on_white():
    image = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    image.putpixel((1, 0), (10, 20, 30, 0))
    assert np.asarray(to_rgb(image)).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def test_load_image_errors(tmp_path):
    png = _png(_image(30, 20))
    for data in [b"", b"definitely not an image", png[: len(png) // 2]]:
        with pytest.raises(ValueError, match=f"<{len(data)} bytes> is not a readable image"):
            load_image(data)
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg' is not a readable image"):
        load_image(path)
    assert load_image(png).size == (30, 20)


def test_load_image_refuses_decompression_bombs():
    png = bytearray(_png(Image.new("1", (1, 1))))
    # Patch the IHDR chunk (after the 8-byte signature: length, b"IHDR", 13 bytes, CRC) to 50000x50000.
    png[16:24] = struct.pack(">II", 50_000, 50_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(bytes(png))
    with pytest.raises(ValueError, match="30x20 pixels, more than max_pixels=500"):
        load_image(_png(_image(30, 20)), max_pixels=500)


def test_load_image_applies_exif_orientation():
    image = _image(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    loaded = load_image(_png(image, exif=exif))
    assert np.array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    assert load_image(image) is image
