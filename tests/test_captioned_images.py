"""Captioned images as training items (`data/captioned_images.py`) against a hand-written reference: the image resized
so its shorter side is the resolution, cut at the centre or at the place drawn from (seed, epoch, index), flipped when
drawn so, one caption of a list; the same item whenever it is asked for again."""

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from dia_diffusion.data.captioned_images import CaptionedImages, EncodedItems, one_caption, rgb
from dia_diffusion.data.image_datasets import DatasetSpecError

RESOLUTION = 8


def images() -> list[PIL.Image.Image]:
    """A landscape and a portrait image, both larger than the resolution on both sides, whose resized long side leaves
    an odd margin (11 pixels) to crop: a centre crop is then neither at the start nor at an even split."""
    draws = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(draws.integers(0, 256, shape, dtype=np.uint8))
        for shape in ((10, 24, 3), (24, 10, 3))
    ]


def rows(captions) -> datasets.Dataset:
    text = datasets.Value("string")
    features = {"image": datasets.Image(), "text": [text] if isinstance(captions[0], list) else text}
    return datasets.Dataset.from_dict(
        {"image": images(), "text": captions}, features=datasets.Features(features)
    )


def reference(
    image: PIL.Image.Image, seed: int, epoch: int, index: int, center_crop: bool, random_flip: bool
):
    """By hand: shorter side to RESOLUTION (bilinear), then the crop and the flip drawn in that order."""
    width, height = image.size
    scale = RESOLUTION / min(width, height)
    size = (RESOLUTION, int(height * scale)) if width < height else (int(width * scale), RESOLUTION)
    resized = image.resize(size, PIL.Image.BILINEAR)
    draws = np.random.default_rng([seed, epoch, index])
    if center_crop:
        top, left = (resized.height - RESOLUTION) // 2, (resized.width - RESOLUTION) // 2
    else:
        top, left = (
            draws.integers(resized.height - RESOLUTION + 1),
            draws.integers(resized.width - RESOLUTION + 1),
        )
    pixels = np.asarray(resized, dtype=np.float32)[top : top + RESOLUTION, left : left + RESOLUTION]
    if random_flip and draws.random() < 0.5:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)


@pytest.mark.parametrize("center_crop", [True, False])
@pytest.mark.parametrize("random_flip", [True, False])
def test_every_item_is_the_reference_crop_of_its_image(center_crop, random_flip):
    items = CaptionedImages(
        rows(["a", "b"]),
        RESOLUTION,
        lambda caption: torch.tensor([ord(caption)]),
        3,
        center_crop,
        random_flip,
    )
    for epoch in range(8):
        items.set_epoch(epoch)
        for index, image in enumerate(images()):
            item = items[index]
            expected = reference(image, 3, epoch, index, center_crop, random_flip)
            torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=1e-6)
            assert item["input_ids"].tolist() == [ord("ab"[index])]


def test_crops_and_flips_change_with_the_epoch_and_not_with_a_second_look():
    items = CaptionedImages(rows(["a", "b"]), RESOLUTION, lambda caption: torch.tensor([0]), 0, False, True)
    first = [items[index]["pixel_values"] for index in range(2)]
    # Before accelerate sets an epoch, the items are epoch 0's.
    torch.testing.assert_close(first[1], reference(images()[1], 0, 0, 1, False, True), rtol=0, atol=1e-6)
    assert all(torch.equal(pixels, items[index]["pixel_values"]) for index, pixels in enumerate(first))
    seen = set()
    for epoch in range(12):
        items.set_epoch(epoch)
        seen.add(items[0]["pixel_values"].numpy().tobytes())
    assert len(seen) > 4


def test_by_default_an_item_is_the_centre_crop_unflipped():
    items = CaptionedImages(rows(["a", "b"]), RESOLUTION, lambda caption: torch.tensor([0]), seed=0)
    for epoch in range(4):
        items.set_epoch(epoch)
        for index, image in enumerate(images()):
            expected = reference(image, 0, epoch, index, center_crop=True, random_flip=False)
            torch.testing.assert_close(items[index]["pixel_values"], expected, rtol=0, atol=1e-6)


def test_a_row_with_several_captions_gives_each_of_them_and_an_empty_list_the_empty_caption():
    seen = []
    items = CaptionedImages(
        rows([["x", "y", "z"], []]), RESOLUTION, lambda c: seen.append(c) or torch.tensor([0]), 0
    )
    for epoch in range(30):
        items.set_epoch(epoch)
        items[0]
    assert set(seen) == {"x", "y", "z"}
    assert one_caption([], np.random.default_rng(0)) == "" and one_caption("w", None) == "w"


def test_an_image_without_an_8_bit_meaning_is_named_in_one_line():
    image = PIL.Image.fromarray(np.full((4, 4), -1.0, dtype=np.float32))
    with pytest.raises(DatasetSpecError, match=r"^image of the dataset has PIL mode 'F' with pixel values"):
        rgb(image)
    image.filename = "/data/depth.tiff"
    with pytest.raises(DatasetSpecError, match=r"^image file '/data/depth.tiff' has PIL mode 'F'"):
        rgb(image)


def test_encoded_items_are_rows_of_their_columns():
    items = EncodedItems(latents=torch.arange(6).view(3, 2), states=torch.arange(3))
    assert len(items) == 3 and items[1]["latents"].tolist() == [2, 3] and items[1]["states"].item() == 1
    with pytest.raises(ValueError, match="columns of different lengths"):
        EncodedItems(latents=torch.zeros(3), states=torch.zeros(2))
