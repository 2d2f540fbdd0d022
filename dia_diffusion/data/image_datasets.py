"""Dataset specs -> Hugging Face `datasets` of PIL images, and the torchvision transforms that feed the UNet.

A spec is one string: `digits`, `fashion_mnist`, `cifar10`, a `cifar-10-python.tar.gz` path, a local image
folder, a `save_to_disk` folder or a hub dataset name. Every spec ends as a `datasets.Dataset` with an "image"
column (and "label" where the source has labels), so training and metrics read all of them the same way. Asked for a
caption column, it also keeps that column, as "text" (an image folder's `metadata.jsonl` gives one).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import socket
import tarfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import datasets
import numpy as np
import PIL.Image
import torch
from torchvision import transforms

from dia_diffusion.data.image_modes import UnsupportedImageError, model_image
from dia_diffusion.runtime.errors import first_line

# Where Debian's `dataset-fashion-mnist` package installs the original idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB_NAME = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

CIFAR10_HUB_NAME = "uoft-cs/cifar10"
CIFAR10_HUB_IMAGE_COLUMN = "img"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# scikit-learn's digits come without a split: the first 1500 images are "train", the other 297 are "test".
DIGITS_TRAIN_SIZE = 1500
DIGITS_MAX_VALUE = 16

# Seconds to wait for a TCP connection to the hub before calling it unreachable; without this check
# `datasets` retries for ~23 s before it gives up.
HUB_CONNECT_TIMEOUT_S = 3.0

_HUB_NAME_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in PIL.Image.registered_extensions())
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class DatasetSpecError(ValueError):
    """A dataset spec that cannot be loaded; its message is one clear line meant for the user (no traceback)."""


def load_image_dataset(
    spec: str, split: str = "train", image_column: str | None = None, caption_column: str | None = None
) -> datasets.Dataset:
    """Returns a datasets.Dataset with an "image" column of PIL images (and "label" ints when the source has labels;
    and "text", the captions of `caption_column`, when that is given)."""
    if spec in ("digits", "fashion_mnist") and caption_column is not None:
        raise DatasetSpecError(f"dataset '{spec}' has no captions (columns: image, label)")
    if spec == "digits":
        return _load_digits(split)
    if spec == "fashion_mnist":
        return _load_fashion_mnist(split)
    if spec == "cifar10":
        hint = "or pass the path of a local cifar-10-python.tar.gz"
        return _load_hub(
            CIFAR10_HUB_NAME, split, image_column or CIFAR10_HUB_IMAGE_COLUMN, hint, caption_column
        )

    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        if caption_column is not None:
            raise DatasetSpecError(f"dataset '{spec}' has no captions (columns: image, label)")
        return _load_cifar10_archive(path, split)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_saved_dataset(path, split, image_column, caption_column)
        return _load_image_folder(path, split, image_column, caption_column)
    if path.exists():
        raise DatasetSpecError(
            f"dataset spec '{spec}' is a file, but only a cifar-10-python.tar.gz is accepted"
        )
    if _looks_like_path(spec):
        raise DatasetSpecError(f"dataset path '{spec}' does not exist")
    return _load_hub(spec, split, image_column, f"and there is no local path '{spec}'", caption_column)


def image_transform(
    resolution: int, channels: int, random_flip: bool = True
) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Any PIL mode to 8-bit grey or RGB (`image_modes.model_image`), resize + centre crop, optional flip, to
    float32 [channels, resolution, resolution] in [-1, 1]."""
    steps = _resize_and_crop(resolution, channels)
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)


def to_uint8_images(images: Sequence[PIL.Image.Image], resolution: int, channels: int) -> torch.Tensor:
    """Deterministic (no flip) conversion for metrics: uint8 tensor [N, channels, resolution, resolution]."""
    # PILToTensor keeps the exact uint8 pixels; going through [-1, 1] floats would round some of them.
    to_tensor = transforms.Compose(_resize_and_crop(resolution, channels) + [transforms.PILToTensor()])
    if len(images) == 0:
        return torch.empty((0, channels, resolution, resolution), dtype=torch.uint8)
    return torch.stack([to_tensor(image) for image in images])


def add_training_transform(
    dataset: datasets.Dataset,
    resolution: int,
    channels: int,
    random_flip: bool = True,
    with_labels: bool = False,
) -> datasets.Dataset:
    """dataset.with_transform(...) producing {"pixel_values": float tensor} per example (and "class_labels", the
    "label" column, `with_labels`), for a torch DataLoader."""
    if "image" not in dataset.column_names:
        raise ValueError(f"dataset has no 'image' column (columns: {dataset.column_names})")
    transform = _PixelValues(image_transform(resolution, channels, random_flip), with_labels)
    return dataset.with_transform(transform)


class _PixelValues:
    """The batch transform `with_transform` applies; a class rather than a closure so DataLoader workers can
    pickle it."""

    def __init__(
        self, transform: Callable[[PIL.Image.Image], torch.Tensor], with_labels: bool = False
    ) -> None:
        self.transform = transform
        self.with_labels = with_labels

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        items = {"pixel_values": [self.transform(image) for image in batch["image"]]}
        if self.with_labels:
            items["class_labels"] = [torch.tensor(label, dtype=torch.long) for label in batch["label"]]
        return items


def _resize_and_crop(resolution: int, channels: int) -> list[Callable]:
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return [
        transforms.Lambda(partial(_model_image, channels=channels)),
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
    ]


def _model_image(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    try:
        return model_image(image, channels)
    except UnsupportedImageError as error:
        # Images read from a file (an image folder) carry its name; others come from bytes inside a dataset.
        name = getattr(image, "filename", "")
        raise DatasetSpecError(f"image {f'file {name!r}' if name else 'of the dataset'} {error}") from None


def _check_split(spec: str, split: str, available: Sequence[str]) -> None:
    if split not in available:
        raise DatasetSpecError(f"dataset '{spec}' has no split '{split}' (splits: {', '.join(available)})")


def _dataset_from_arrays(
    pixels: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))}
    )
    return datasets.Dataset.from_dict({"image": list(pixels), "label": labels.tolist()}, features=features)


def _load_digits(split: str) -> datasets.Dataset:
    from sklearn.datasets import load_digits

    _check_split("digits", split, ("train", "test"))
    digits = load_digits()
    rows = slice(None, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    pixels = np.round(digits.images[rows] * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    return _dataset_from_arrays(pixels, digits.target[rows], [str(digit) for digit in range(10)])


def _load_fashion_mnist(split: str) -> datasets.Dataset:
    _check_split("fashion_mnist", split, ("train", "test"))
    prefix = "train" if split == "train" else "t10k"
    images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_file.is_file() and labels_file.is_file()):
        hint = f"and {FASHION_MNIST_DIR} has no idx files (apt-get install dataset-fashion-mnist)"
        return _load_hub(FASHION_MNIST_HUB_NAME, split, None, hint)
    pixels = _read_idx(images_file)
    labels = _read_idx(labels_file)
    if pixels.ndim != 3 or labels.ndim != 1 or len(pixels) != len(labels):
        raise DatasetSpecError(
            f"fashion_mnist: {images_file} {pixels.shape} and {labels_file} {labels.shape} do not match"
        )
    return _dataset_from_arrays(pixels, labels, FASHION_MNIST_CLASSES)


def _read_idx(path: Path) -> np.ndarray:
    """The idx format: two zero bytes, a type byte (0x08 = uint8), the number of dims, big-endian uint32 dims,
    then the data."""
    with gzip.open(path, "rb") as file:
        content = file.read()
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        raise DatasetSpecError(f"{path} is not a uint8 idx file")
    ndim = content[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(content[4:header_size], dtype=">u4"))
    data = np.frombuffer(content[header_size:], dtype=np.uint8)
    if len(shape) != ndim or data.size != int(np.prod(shape)):
        raise DatasetSpecError(f"{path} is truncated: its header promises shape {shape}")
    return data.reshape(shape)


def _load_cifar10_archive(path: Path, split: str) -> datasets.Dataset:
    """Reads the pickled batches of the original CIFAR-10 python archive without extracting it."""
    _check_split(str(path), split, ("train", "test"))
    wanted = [f"data_batch_{index}" for index in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            missing = [name for name in wanted if name not in members]
            if missing:
                raise DatasetSpecError(
                    f"{path} is not a cifar-10-python archive: it lacks {', '.join(missing)}"
                )
            # The archive's own pickles, read the way the CIFAR-10 page documents (bytes keys).
            batches = [pickle.load(archive.extractfile(members[name]), encoding="bytes") for name in wanted]
        # Each row is 3072 bytes: the red, then green, then blue 32x32 plane.
        pixels = (
            np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
        labels = np.concatenate([np.asarray(batch[b"labels"]) for batch in batches])
    except DatasetSpecError:
        raise
    except (tarfile.TarError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as error:
        raise DatasetSpecError(
            f"{path} cannot be read as a cifar-10-python archive: {first_line(error)}"
        ) from None
    return _dataset_from_arrays(np.ascontiguousarray(pixels), labels, CIFAR10_CLASSES)


def _load_saved_dataset(
    path: Path, split: str, image_column: str | None, caption_column: str | None
) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        _check_split(str(path), split, list(loaded))
        loaded = loaded[split]
    else:
        # A saved single Dataset carries no split name; it serves as the "train" split.
        _check_split(str(path), split, ("train",))
    return _with_image_column(loaded, str(path), image_column, caption_column)


def _load_image_folder(
    path: Path, split: str, image_column: str | None, caption_column: str | None
) -> datasets.Dataset:
    image_files = sorted(file for file in path.rglob("*") if file.suffix.lower() in _IMAGE_EXTENSIONS)
    if not image_files:
        raise DatasetSpecError(f"image folder '{path}' contains no image files")
    # Every file is decoded now, so a bad one is named before training or measuring starts rather than failing a
    # batch mid-run (PIL's `verify` reads only the structure: a truncated JPEG passes it).
    for file in image_files:
        open_image_file(file, reduced=True)
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except ValueError as error:  # pyarrow's ArrowInvalid: a metadata file it cannot parse
        raise DatasetSpecError(
            f"image folder '{path}': its metadata cannot be read: {first_line(error)}"
        ) from None
    _check_split(str(path), split, list(loaded))
    return _with_image_column(loaded[split], str(path), image_column, caption_column)


def open_image_file(file: Path, reduced: bool = False) -> PIL.Image.Image:
    """The image in `file`, decoded in full and checked to convert to the model's modes; a file that fails either
    raises DatasetSpecError naming it. `reduced` decodes a JPEG at 1/8 of its width and height, which still reads
    and checks every byte."""
    try:
        with PIL.Image.open(file) as image:
            if reduced:
                image.draft(None, (1, 1))
            image.load()
            model_image(image, 3)
            return image
    except UnsupportedImageError as error:
        raise DatasetSpecError(f"image file '{file}' {error}") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise DatasetSpecError(f"image file '{file}' is corrupt or unreadable: {first_line(error)}") from None


def _load_hub(
    name: str, split: str, image_column: str | None, hint: str, caption_column: str | None = None
) -> datasets.Dataset:
    unavailable = _hub_unavailable_reason()
    # With `datasets` itself in offline mode, load_dataset answers at once, from the cache when it can.
    if unavailable and not datasets.config.HF_HUB_OFFLINE:
        raise DatasetSpecError(f"hub dataset '{name}' cannot be loaded: {unavailable} ({hint})")
    try:
        loaded = datasets.load_dataset(name, split=split)
    except ConnectionError as error:
        reason = unavailable or first_line(error)
        raise DatasetSpecError(f"hub dataset '{name}' cannot be loaded: {reason} ({hint})") from None
    except FileNotFoundError:
        raise DatasetSpecError(
            f"hub dataset '{name}' was not found on the Hugging Face hub ({hint})"
        ) from None
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise DatasetSpecError(f"hub dataset '{name}' has no split '{split}': {first_line(error)}") from None
    return _with_image_column(loaded, name, image_column, caption_column)


def _hub_unavailable_reason() -> str | None:
    offline_variables = [name for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if _env_true(name)]
    if offline_variables or datasets.config.HF_HUB_OFFLINE:
        variables = " or ".join(offline_variables) or "HF_DATASETS_OFFLINE"
        return f"offline mode is on ({variables}) and no cached copy was found"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows whether the hub is reachable; let `datasets` try
    endpoint = urlparse(datasets.config.HF_ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError:
        return f"{endpoint.hostname} cannot be reached (no network; set HF_DATASETS_OFFLINE=1 to use a cached copy)"
    return None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE_VALUES


def _with_image_column(
    dataset: datasets.Dataset, spec: str, image_column: str | None, caption_column: str | None = None
) -> datasets.Dataset:
    """Renames the source's image column to "image" and keeps only it and an integer "label", or, given a
    `caption_column`, it and the captions, as "text"."""
    columns = dataset.column_names
    if caption_column is not None:
        dataset = _with_captions(dataset, spec, caption_column)
    if image_column is None:
        image_columns = [
            name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)
        ]
        if not image_columns:
            raise DatasetSpecError(
                f"dataset '{spec}' has no image column (columns: {', '.join(columns)}); pass --image_column"
            )
        image_column = "image" if "image" in image_columns else image_columns[0]
    if image_column not in columns:
        raise DatasetSpecError(
            f"dataset '{spec}' has no column '{image_column}' (columns: {', '.join(columns)})"
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise DatasetSpecError(
            f"column '{image_column}' of dataset '{spec}' holds {type(dataset.features[image_column]).__name__}, "
            "not images"
        )
    label = dataset.features.get("label")
    has_int_label = isinstance(label, datasets.ClassLabel) or (
        isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint"))
    )
    keep = {image_column} | ({"label"} if has_int_label and image_column != "label" else set())
    if caption_column is not None:
        keep = {image_column, "text"}
    dataset = dataset.remove_columns([name for name in columns if name not in keep])
    return dataset if image_column == "image" else dataset.rename_column(image_column, "image")


def _with_captions(dataset: datasets.Dataset, spec: str, caption_column: str) -> datasets.Dataset:
    """The captions, renamed "text": a string per image, or a list of strings (one is drawn per use)."""
    columns = dataset.column_names
    if caption_column not in columns:
        raise DatasetSpecError(
            f"dataset '{spec}' has no caption column '{caption_column}' (columns: {', '.join(columns)}); pass "
            "--caption_column"
        )
    feature = dataset.features[caption_column]
    inner = getattr(feature, "feature", feature)  # a list of captions
    if not (isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")):
        raise DatasetSpecError(f"column '{caption_column}' of dataset '{spec}' holds {feature}, not captions")
    if caption_column == "text":
        return dataset
    return dataset.remove_columns([name for name in ["text"] if name in columns]).rename_column(
        caption_column, "text"
    )


def _looks_like_path(spec: str) -> bool:
    """Hub names are `name` or `owner/name`; anything else (an absolute, relative or archive path) is a path."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(_ARCHIVE_SUFFIXES)
        or os.sep in spec.replace("/", "", 1)
        or _HUB_NAME_PATTERN.fullmatch(spec) is None
    )
