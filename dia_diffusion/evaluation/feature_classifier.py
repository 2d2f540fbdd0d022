"""A small CNN classifier trained on a dataset, whose penultimate features define "FD (classifier features)".

Inception FID needs a weights file that machines without internet do not have. A Fréchet distance in the feature
space of a classifier trained on the same dataset is the usual stand-in for MNIST-like data; it ranks samples by
how class-like they look to a network that knows the data, but its values are comparable only with other values
from the same classifier (same cache file, same sha256) — never with FID.

The classifier trains once per (dataset, resolution, channels) and is cached; its held-out accuracy is stored
with it and reported wherever its features are used.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dia_diffusion.data.image_datasets import load_image_dataset, to_uint8_images
from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.output_files import check_output_path, write_atomically

CLASSIFIER_FORMAT = "dia_diffusion.evaluation.feature_classifier.v1"
HELD_OUT_FRACTION = 0.1
MIN_LABELLED_IMAGES = 20
# Training length: at least 30k images and at least two epochs (20 epochs of digits, 2 of Fashion-MNIST).
TRAINING_IMAGES_SEEN = 30_000
TRAINING_EPOCHS = 2
TRAINING_BATCH_SIZE = 128
LEARNING_RATE = 2e-3


class ClassifierDataError(ValueError):
    """The dataset cannot train a classifier (no labels, too few images); the message is one line for the user."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dia_diffusion"


class FeatureClassifier(nn.Module):
    """Three 3×3 convolution stages (the last two stride 2) → global average pool → linear head.

    Works at any resolution ≥ 4; `features` (the pooled activations) are what the Fréchet distance compares.
    BatchNorm runs in eval mode when measuring, so each image's features do not depend on its batch.
    """

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.channels = channels
        self.num_classes = num_classes
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        in_width = channels
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_width = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_width, num_classes)

    @property
    def feature_dimension(self) -> int:
        return self.widths[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, channels, H, W] → pooled features [N, feature_dimension]."""
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        pixels = images.to(self.head.weight.dtype) / 127.5 - 1.0
        return self.body(pixels).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class TrainedClassifier:
    """A classifier with the facts that identify it: where it is cached, its sha256, and how well it classifies."""

    model: FeatureClassifier
    path: Path
    sha256: str
    dataset: str
    image_column: str | None
    resolution: int
    channels: int
    accuracy: float
    held_out_images: int


def classifier_cache_path(
    cache_dir: str | Path | None,
    dataset: str,
    resolution: int,
    channels: int,
    image_column: str | None = None,
) -> Path:
    """<cache_dir>/classifiers/<dataset>-<resolution>-<channels>.pt; local paths get a hash so two folders never collide."""
    if os.path.exists(dataset):
        absolute = os.path.abspath(dataset)
        name = f"{Path(absolute).name}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"
    else:
        name = dataset
    if image_column is not None:
        name = f"{name}-{image_column}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
    return Path(cache_dir or default_cache_dir()) / "classifiers" / f"{name}-{resolution}-{channels}.pt"


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[FeatureClassifier, float, int]:
    """Trains on a seeded 90 % of (uint8 images [N, C, H, W], int labels [N]); returns (model, held-out accuracy, held-out count)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {list(images.shape)}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
    if images.shape[0] < MIN_LABELLED_IMAGES:
        raise ClassifierDataError(
            f"a feature classifier needs at least {MIN_LABELLED_IMAGES} labelled images, got {images.shape[0]}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    held_out_count = max(1, round(HELD_OUT_FRACTION * images.shape[0]))
    held_out, training = order[:held_out_count], order[held_out_count:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(images.shape[1], num_classes)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    epochs = max(TRAINING_EPOCHS, math.ceil(TRAINING_IMAGES_SEEN / len(training)))
    steps_per_epoch = math.ceil(len(training) / TRAINING_BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    progress = tqdm(total=epochs * steps_per_epoch, desc="training the feature classifier", unit="step")
    model.train()
    for _ in range(epochs):
        shuffled = training[torch.randperm(len(training), generator=generator)]
        for start in range(0, len(shuffled), TRAINING_BATCH_SIZE):
            batch = shuffled[start : start + TRAINING_BATCH_SIZE]
            loss = F.cross_entropy(model(images[batch].to(device)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
    model.eval()

    correct = 0
    with torch.no_grad():
        for start in range(0, held_out_count, 1024):
            batch = held_out[start : start + 1024]
            predictions = model(images[batch].to(device)).argmax(dim=1).cpu()
            correct += int((predictions == labels[batch]).sum())
    accuracy = correct / held_out_count
    progress.set_postfix_str(f"held-out accuracy {100 * accuracy:.1f}% ({held_out_count} images)")
    progress.close()
    return model.cpu(), accuracy, held_out_count


def labelled_images(
    dataset: str, resolution: int, channels: int, image_column: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All images of a dataset's train split as uint8 [N, channels, resolution, resolution], their labels, the class count."""
    rows = load_image_dataset(dataset, split="train", image_column=image_column)
    if "label" not in rows.column_names:
        raise ClassifierDataError(
            f"classifier features need class labels, and dataset {dataset!r} has no 'label' column; "
            "use --feature inception or --feature dinov2, or a labelled dataset (e.g. an image folder with one "
            "sub-folder per class)"
        )
    chunks = [
        to_uint8_images(rows[start : start + 1024]["image"], resolution, channels)
        for start in range(0, len(rows), 1024)
    ]
    labels = torch.tensor(rows["label"], dtype=torch.long)
    label_feature = rows.features["label"]
    num_classes = getattr(label_feature, "num_classes", None) or int(labels.max()) + 1
    return torch.cat(chunks), labels, num_classes


def load_classifier(path: str | Path) -> TrainedClassifier:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # torch reports a file cut short as a RuntimeError, an EOFError or, past the zip header, OSError EINVAL.
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as error:
        # A damaged cache file (a full disk, a copy cut short): the classifier is trained again once it is gone.
        raise ClassifierDataError(
            f"feature classifier file {str(path)!r} is damaged ({first_line(error)}); delete it to train it again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierDataError(f"{str(path)!r} is not a feature classifier file")
    model = FeatureClassifier(payload["channels"], payload["num_classes"], tuple(payload["widths"]))
    model.load_state_dict(payload["state_dict"])
    model.eval().requires_grad_(False)
    return TrainedClassifier(
        model=model,
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        dataset=payload["dataset"],
        image_column=payload["image_column"],
        resolution=payload["resolution"],
        channels=payload["channels"],
        accuracy=payload["accuracy"],
        held_out_images=payload["held_out_images"],
    )


def load_or_train_classifier(
    dataset: str,
    resolution: int,
    channels: int,
    image_column: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TrainedClassifier:
    """The cached classifier for (dataset, resolution, channels), trained and written atomically on first use."""
    path = classifier_cache_path(cache_dir, dataset, resolution, channels, image_column)
    if not path.exists():
        # Before the training, which can take minutes: a cache that cannot be written is refused now.
        check_output_path(path, "the feature classifier cache")
        images, labels, num_classes = labelled_images(dataset, resolution, channels, image_column)
        model, accuracy, held_out_count = train_classifier(images, labels, num_classes, device=device)
        payload = {
            "format": CLASSIFIER_FORMAT,
            "state_dict": model.state_dict(),
            "channels": channels,
            "num_classes": num_classes,
            "widths": list(model.widths),
            "dataset": dataset,
            "image_column": image_column,
            "resolution": resolution,
            "accuracy": accuracy,
            "held_out_images": held_out_count,
        }
        write_atomically(path, lambda partial: save_reproducibly(payload, partial))
    return load_classifier(path)


def save_reproducibly(payload: dict, path: Path) -> None:
    """torch.save through an open file: saved to a path, torch names the archive inside after the file (here a
    temporary name with the process id), so the same weights would get a new sha256, the identity every measurement
    records, each time they are trained."""
    with open(path, "wb") as stream:
        torch.save(payload, stream)
