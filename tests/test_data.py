"""Dataset specs: every offline source (digits, Fashion-MNIST files, a CIFAR-10 archive, image folders,
save_to_disk folders) and every user-facing error, including a hub name without the network. The transforms and
image modes are tested in test_image_transforms.py."""

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
from image_files import random_pixels, spec_error, write_png
from sklearn.datasets import load_digits

from dia_diffusion.data import image_datasets as data
from dia_diffusion.data.image_datasets import (
    load_image_dataset,
)

pytestmark = pytest.mark.usefixtures("private_datasets_cache")


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


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
