"""Images as the model sees them: the transforms (channels, range, centre crop, flips, the exact uint8 pixels) and
every PIL mode, 16-bit and transparent images, and undecodable files named before any image is used."""

import io
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from image_files import random_pixels, spec_error, write_png

from dia_diffusion.data import image_datasets as data
from dia_diffusion.data.image_datasets import (
    add_training_transform,
    image_transform,
    load_image_dataset,
    to_uint8_images,
)

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


# ---------------------------------------------------------------- transforms


def test_image_transform_matches_channels_and_range():
    grey = PIL.Image.fromarray(random_pixels(0, 20, 30))
    rgb = PIL.Image.fromarray(random_pixels(1, 20, 30, 3))
    for image, channels in [(grey, 3), (rgb, 1), (rgb, 3), (grey, 1)]:
        pixels = image_transform(16, channels)(image)
        assert pixels.shape == (channels, 16, 16) and pixels.dtype == torch.float32
        assert -1 <= pixels.min() < pixels.max() <= 1
    grey_as_rgb = image_transform(16, 3, random_flip=False)(grey)
    torch.testing.assert_close(grey_as_rgb[0], grey_as_rgb[2])


def test_image_transform_crops_the_centre():
    # A tall image, white at top and bottom, black in the middle half: the centre crop keeps only black.
    tall = np.full((40, 20), 255, dtype=np.uint8)
    tall[10:30] = 0
    pixels = image_transform(10, 1, random_flip=False)(PIL.Image.fromarray(tall))
    assert pixels.shape == (1, 10, 10)
    assert pixels[:, 2:-2].max() == -1


def test_random_flip_mirrors_and_can_be_turned_off():
    ramp = PIL.Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)))
    torch.manual_seed(0)
    flipping = image_transform(8, 1, random_flip=True)
    outputs = [flipping(ramp) for _ in range(16)]
    unflipped = image_transform(8, 1, random_flip=False)(ramp)
    assert any(torch.equal(output, unflipped) for output in outputs)
    assert any(torch.equal(output, unflipped.flip(-1)) for output in outputs)
    assert all(torch.equal(image_transform(8, 1, random_flip=False)(ramp), unflipped) for _ in range(4))


def test_to_uint8_images_is_exact_and_agrees_with_the_training_transform():
    arrays = [random_pixels(seed, 12, 12, 3) for seed in range(3)]
    images = [PIL.Image.fromarray(array) for array in arrays]
    exact = to_uint8_images(images, 12, 3)
    assert exact.dtype == torch.uint8 and exact.shape == (3, 3, 12, 12)
    np.testing.assert_array_equal(exact.permute(0, 2, 3, 1).numpy(), np.stack(arrays))

    resized = to_uint8_images(images, 8, 1)
    as_float = image_transform(8, 1, random_flip=False)(images[1])
    torch.testing.assert_close(resized[1].float() / 127.5 - 1, as_float, atol=1e-6, rtol=0)
    assert to_uint8_images([], 8, 1).shape == (0, 1, 8, 8)


def test_transform_arguments_are_validated():
    with pytest.raises(ValueError, match="channels"):
        image_transform(8, 2)
    with pytest.raises(ValueError, match="resolution"):
        to_uint8_images([], 0, 3)


def test_training_transform_feeds_a_dataloader():
    digits = load_image_dataset("digits", split="test")
    training = add_training_transform(digits, resolution=16, channels=3)
    example = training[0]
    assert list(example) == ["pixel_values"] and example["pixel_values"].shape == (3, 16, 16)

    # A DataLoader worker receives the dataset pickled.
    restored = pickle.loads(pickle.dumps(training))
    batch = next(iter(torch.utils.data.DataLoader(restored, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32

    with pytest.raises(ValueError, match="image"):
        add_training_transform(digits.rename_column("image", "picture"), 16, 3)


# ---------------------------------------------------------------- image modes and undecodable files

# Every mode PIL knows: a pixel value in that mode's own range, and the 8-bit grey it stands for.
GREY_200_IN_EVERY_MODE = {
    "1": (1, 255),
    "L": (200, 200),
    "LA": ((200, 255), 200),
    "La": ((200, 255), 200),
    "P": (0, 200),  # palette entry 0 is (200, 200, 200)
    "PA": ((0, 255), 200),
    "RGB": ((200, 200, 200), 200),
    "RGBA": ((200, 200, 200, 255), 200),
    "RGBa": ((200, 200, 200, 255), 200),
    "RGBX": ((200, 200, 200, 255), 200),
    "CMYK": ((55, 55, 55, 0), 200),
    "YCbCr": ((200, 128, 128), 200),
    "HSV": ((0, 0, 200), 200),
    "I;16": (200 * 257, 200),
    "I;16B": (200 * 257, 200),
    "I;16L": (200 * 257, 200),
    "I;16N": (200 * 257, 200),
    "I": (200 * 257, 200),
    "F": (200 / 255, 200),
    "LAB": ((200, 128, 128), 194),  # L* = 200 / 255 * 100 = 78.4 is sRGB grey 194
}


@pytest.mark.parametrize("mode", PIL.Image.MODES)
def test_every_pil_mode_becomes_8_bit_grey_or_rgb_in_its_own_range(mode):
    value, grey = GREY_200_IN_EVERY_MODE[mode]
    image = PIL.Image.new(mode, (5, 4), value)
    if mode in ("P", "PA"):
        image.putpalette([200, 200, 200] * 256)
    for channels in (1, 3):
        pixels = to_uint8_images([image], 4, channels)
        assert pixels.shape == (1, channels, 4, 4)
        assert pixels.unique().tolist() == [grey], f"{mode} -> {channels} channels"


def sixteen_bit_folder(root, pictures: list[np.ndarray]):
    """The same pictures as 8-bit PNGs in root/8 and as 16-bit PNGs (value v stored as v * 257) in root/16."""
    for index, picture in enumerate(pictures):
        write_png(root / "8" / f"{index}.png", picture)
        write_png(root / "16" / f"{index}.png", picture.astype(np.uint16) * 257)
    return root / "8", root / "16"


def test_a_16_bit_png_gives_the_pixels_of_its_8_bit_equivalent(tmp_path):
    folder_8, folder_16 = sixteen_bit_folder(tmp_path, [random_pixels(seed, 12, 10) for seed in range(3)])
    eight, sixteen = load_image_dataset(str(folder_8)), load_image_dataset(str(folder_16))
    assert {image.mode for image in sixteen["image"]} == {"I;16"}
    for channels in (1, 3):
        exact_8, exact_16 = (
            to_uint8_images(eight["image"], 8, channels),
            to_uint8_images(sixteen["image"], 8, channels),
        )
        assert (
            exact_16.float().mean() == exact_8.float().mean()
            and exact_16.float().std() == exact_8.float().std()
        )
        assert torch.equal(exact_16, exact_8)
        training_8 = add_training_transform(eight, 8, channels, random_flip=False)
        training_16 = add_training_transform(sixteen, 8, channels, random_flip=False)
        for index in range(len(eight)):
            assert torch.equal(training_16[index]["pixel_values"], training_8[index]["pixel_values"])

    # Values that are no multiple of 257 round to the nearest 8-bit level.
    ramp = np.arange(0, 65536, 257 * 16 + 100, dtype=np.uint16).reshape(1, -1)
    image = PIL.Image.fromarray(ramp)
    np.testing.assert_array_equal(
        np.asarray(data._model_image(image, 1)), np.round(ramp / 257).astype(np.uint8)
    )


def test_transparent_pixels_are_composited_over_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 240  # the colour stored under the alpha, which a viewer shows only where it is opaque
    rgba[..., 3] = [[255, 0], [128, 0]]
    pixels = to_uint8_images([PIL.Image.fromarray(rgba)], 2, 3)
    assert pixels[:, :, 0, 0].unique().item() == 240 and pixels[:, :, 0, 1].unique().item() == 0
    assert pixels[:, :, 1, 0].unique().item() == round(240 * 128 / 255)

    palette = PIL.Image.new("P", (2, 1), 0)
    palette.putpalette([255, 255, 255, 90, 90, 90])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 (white) is transparent
    assert to_uint8_images([palette], 1, 1)[0, 0, 0].tolist() == [0]


def test_an_image_outside_its_modes_range_is_refused_by_file_name(tmp_path):
    folder = tmp_path / "floats"
    write_png(folder / "fine.png", random_pixels(0, 6, 6))
    # Float pixels 0-255 instead of 0-1: PIL would clip them all to white (or black).
    PIL.Image.fromarray(random_pixels(1, 6, 6).astype(np.float32)).save(folder / "wide.tiff")
    message = spec_error(str(folder))
    assert str(folder / "wide.tiff") in message and "'F'" in message and "0-1" in message


def test_a_truncated_jpeg_is_named_before_any_image_is_used(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    PIL.Image.fromarray(random_pixels(0, 64, 64, 3)).save(folder / "whole.jpg")
    jpeg = io.BytesIO()
    PIL.Image.fromarray(random_pixels(1, 64, 64, 3)).save(jpeg, format="JPEG")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4])
    with PIL.Image.open(folder / "cut.jpg") as image:
        image.verify()  # the structure check alone lets it through
    message = spec_error(str(folder))
    assert str(folder / "cut.jpg") in message and "truncated" in message and "whole.jpg" not in message
