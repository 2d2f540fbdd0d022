"""Dataset specs and image transforms: every offline source, every user-facing error, the exact pixels."""

import gzip
import io
import pickle
import struct
import tarfile
import time

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_digits

from dia_diffusion.data import image_datasets as data
from dia_diffusion.data.image_datasets import (
    DatasetSpecError,
    add_training_transform,
    image_transform,
    load_image_dataset,
    to_uint8_images,
)


def spec_error(spec: str, **kwargs) -> str:
    """Loads a spec that must fail and returns its message, which must be a single line."""
    with pytest.raises(DatasetSpecError) as caught:
        load_image_dataset(spec, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def random_pixels(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches image folders it has read; keep that cache inside the test's own folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_and_scaled_to_uint8():
    digits = load_digits()
    train = load_image_dataset("digits", split="train")
    test = load_image_dataset("digits", split="test")
    assert (len(train), len(test)) == (data.DIGITS_TRAIN_SIZE, len(digits.images) - data.DIGITS_TRAIN_SIZE)

    first_test = test[0]
    expected = np.round(digits.images[data.DIGITS_TRAIN_SIZE] * 255 / 16).astype(np.uint8)
    assert first_test["image"].mode == "L"
    np.testing.assert_array_equal(np.asarray(first_test["image"]), expected)
    assert first_test["label"] == digits.target[data.DIGITS_TRAIN_SIZE]
    assert train["label"] == digits.target[: data.DIGITS_TRAIN_SIZE].tolist()
    assert max(np.asarray(image).max() for image in train[:50]["image"]) == 255


def test_unknown_split_lists_the_splits():
    message = spec_error("digits", split="validation")
    assert "validation" in message and "train" in message and "test" in message


# ---------------------------------------------------------------- fashion_mnist


@pytest.fixture
def fashion_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    return tmp_path


def test_fashion_mnist_reads_idx_files(fashion_dir):
    train_pixels, test_pixels = random_pixels(0, 5, 28, 28), random_pixels(1, 3, 28, 28)
    write_idx(fashion_dir / "train-images-idx3-ubyte.gz", train_pixels)
    write_idx(fashion_dir / "train-labels-idx1-ubyte.gz", np.array([9, 0, 3, 3, 1]))
    write_idx(fashion_dir / "t10k-images-idx3-ubyte.gz", test_pixels)
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", np.array([2, 7, 5]))

    train = load_image_dataset("fashion_mnist")
    test = load_image_dataset("fashion_mnist", split="test")
    assert train["label"] == [9, 0, 3, 3, 1] and test["label"] == [2, 7, 5]
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in train["image"]]), train_pixels)
    np.testing.assert_array_equal(np.asarray(test[2]["image"]), test_pixels[2])
    assert train.features["label"].int2str(9) == "Ankle boot"


def test_fashion_mnist_truncated_idx_names_the_file(fashion_dir):
    images_file = fashion_dir / "train-images-idx3-ubyte.gz"
    write_idx(images_file, random_pixels(0, 4, 28, 28))
    write_idx(fashion_dir / "train-labels-idx1-ubyte.gz", np.arange(4))
    with gzip.open(images_file, "rb") as file:
        content = file.read()
    with gzip.open(images_file, "wb") as file:
        file.write(content[:-10])
    message = spec_error("fashion_mnist")
    assert str(images_file) in message and "truncated" in message


def test_fashion_mnist_without_files_or_network_says_how_to_install(fashion_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = spec_error("fashion_mnist")
    assert data.FASHION_MNIST_HUB_NAME in message and "apt-get install dataset-fashion-mnist" in message


@pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_fashion_mnist_installed_test_split():
    test = load_image_dataset("fashion_mnist", split="test")
    assert len(test) == 10_000 and test[0]["image"].size == (28, 28)
    assert sorted(set(test["label"])) == list(range(10))


# ---------------------------------------------------------------- cifar-10 archive


def write_cifar_archive(path, batches: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, (rows, labels) in batches.items():
            payload = pickle.dumps({b"data": rows, b"labels": labels})
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))


def test_cifar10_archive_keeps_channel_planes_and_splits(tmp_path):
    batches = {
        f"data_batch_{index}": (random_pixels(index, 2, 3072), [index, index + 1]) for index in range(1, 6)
    }
    test_rows = random_pixels(9, 3, 3072)
    batches["test_batch"] = (test_rows, [4, 2, 0])
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(archive, batches)

    train = load_image_dataset(str(archive))
    test = load_image_dataset(str(archive), split="test")
    assert len(train) == 10 and train["label"][:4] == [1, 2, 2, 3]
    assert test["label"] == [4, 2, 0]
    image = test[1]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    # Row layout: 1024 red bytes, 1024 green, 1024 blue, each a row-major 32x32 plane.
    expected = test_rows[1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_cifar10_archive_errors_name_the_archive(tmp_path):
    incomplete = tmp_path / "incomplete.tar.gz"
    write_cifar_archive(incomplete, {"data_batch_1": (random_pixels(0, 1, 3072), [0])})
    assert "test_batch" in spec_error(str(incomplete), split="test")

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive")
    assert str(garbage) in spec_error(str(garbage))


# ---------------------------------------------------------------- local folders


def test_image_folder_labels_come_from_sub_folders(tmp_path):
    folder_path = tmp_path / "images"
    write_png(folder_path / "cat" / "a.png", random_pixels(0, 12, 10, 3))
    write_png(folder_path / "cat" / "b.png", random_pixels(1, 12, 10, 3))
    write_png(folder_path / "dog" / "c.png", random_pixels(2, 7, 9, 3))

    folder = load_image_dataset(str(folder_path))
    assert folder.column_names == ["image", "label"] and len(folder) == 3
    names = [folder.features["label"].int2str(label) for label in folder["label"]]
    assert sorted(names) == ["cat", "cat", "dog"]
    assert sorted(image.size for image in folder["image"]) == [(9, 7), (10, 12), (10, 12)]
    assert "validation" in spec_error(str(folder_path), split="validation")


def test_folder_errors(tmp_path):
    assert "does not exist" in spec_error(str(tmp_path / "missing"))
    assert "does not exist" in spec_error("./no/such/folder")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "no image files" in spec_error(str(empty))

    broken = tmp_path / "broken"
    write_png(broken / "good.png", random_pixels(0, 8, 8, 3))
    png = io.BytesIO()
    PIL.Image.fromarray(random_pixels(1, 8, 8, 3)).save(png, format="PNG")
    (broken / "bad.png").write_bytes(png.getvalue()[:40])
    message = spec_error(str(broken))
    assert str(broken / "bad.png") in message and "good.png" not in message


def saved_images(seed: int, count: int) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(random_pixels(seed + index, 6, 6, 3)) for index in range(count)]


def test_save_to_disk_dataset_finds_and_renames_the_image_column(tmp_path):
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b"]),
            "caption": datasets.Value("string"),
        }
    )
    source = datasets.Dataset.from_dict(
        {"img": saved_images(0, 3), "label": [1, 0, 1], "caption": ["x", "y", "z"]}, features=features
    )
    source.save_to_disk(str(tmp_path / "saved"))

    loaded = load_image_dataset(str(tmp_path / "saved"))
    assert loaded.column_names == ["image", "label"] and loaded["label"] == [1, 0, 1]
    np.testing.assert_array_equal(np.asarray(loaded[2]["image"]), np.asarray(source[2]["img"]))

    missing = spec_error(str(tmp_path / "saved"), image_column="photo")
    assert "'photo'" in missing and "img" in missing and "caption" in missing
    assert "not images" in spec_error(str(tmp_path / "saved"), image_column="caption")
    assert "split 'test'" in spec_error(str(tmp_path / "saved"), split="test")


def test_save_to_disk_dataset_dict_selects_the_split(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": saved_images(0, 4)}),
            "test": datasets.Dataset.from_dict({"image": saved_images(10, 2)}),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    test = load_image_dataset(str(tmp_path / "saved"), split="test")
    assert test.column_names == ["image"] and len(test) == 2
    np.testing.assert_array_equal(np.asarray(test[1]["image"]), np.asarray(splits["test"][1]["image"]))


# ---------------------------------------------------------------- the hub, without network


def test_hub_name_offline_fails_at_once_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    message = spec_error("someone/some_images")
    assert time.perf_counter() - started < 5
    assert "someone/some_images" in message and "HF_DATASETS_OFFLINE" in message


def test_hub_name_without_network_fails_at_once_even_online(monkeypatch):
    for variable in (
        "HF_DATASETS_OFFLINE",
        "HF_HUB_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(address, timeout):
        raise OSError(f"cannot connect to {address} within {timeout} s")

    monkeypatch.setattr(data.socket, "create_connection", unreachable)
    message = spec_error("someone/some_images")
    assert "cannot be reached" in message and "no local path 'someone/some_images'" in message


def test_hub_name_with_datasets_offline_mode_turns_its_error_into_one_line(monkeypatch):
    # `datasets` reads HF_DATASETS_OFFLINE at import; its parsed flag is what load_dataset consults.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    message = spec_error("cifar10")
    assert time.perf_counter() - started < 5
    assert data.CIFAR10_HUB_NAME in message and "cifar-10-python.tar.gz" in message


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
