"""The two sides of `dia-diffusion fid` (and the one of `ref`): what a SPEC names, and what it says about its images
before any is read.

A SPEC is one of
- a `.npz` written by `dia-diffusion ref` (cached feature statistics of real data),
- a saved pipeline folder (has model_index.json): `--num_samples` images are generated, image i seeded seed+i,
- a folder written by pipelines/sample.py (has samples.json): its numbered PNGs, with how they were sampled,
- a dataset spec as training takes it: digits, fashion_mnist, cifar10, an image folder, a save_to_disk folder,
  a hub name.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from dia_diffusion.data.image_datasets import load_image_dataset
from dia_diffusion.data.image_modes import GREY_MODES
from dia_diffusion.evaluation.feature_extractors import FeatureExtractor
from dia_diffusion.evaluation.frechet import FeatureStatistics
from dia_diffusion.pipelines.sampling import GRID_FILE, SAMPLES_RECORD, is_sample_file

SPEC_HELP = (
    "a dataset spec, an image folder, a .npz from `dia-diffusion ref`, a pipeline folder or a samples folder"
)


class SpecError(ValueError):
    """A SPEC that cannot be used as asked; the message is one line for the user."""


@dataclass
class Source:
    """One side of a comparison: what the SPEC is, and what it says about the images before any is read."""

    spec: str
    kind: str  # "statistics" | "pipeline" | "samples" | "dataset"
    statistics: FeatureStatistics | None = None
    record: dict[str, Any] = field(default_factory=dict)
    loaded: dict[tuple[str, str | None], datasets.Dataset] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, spec: str) -> Source:
        path = Path(spec).expanduser()
        if spec.endswith(".npz"):
            if not path.is_file():
                raise SpecError(
                    f"statistics file {spec!r} does not exist (write it with `dia-diffusion ref`)"
                )
            statistics, metadata = FeatureStatistics.load(path)
            return cls(spec, "statistics", statistics, metadata)
        if (path / "model_index.json").is_file():
            config_file = path / "unet" / "config.json"
            if not config_file.is_file():
                raise SpecError(f"pipeline folder {spec!r} has no unet/config.json")
            config = read_record(config_file, ("sample_size", "in_channels"))
            return cls(
                spec,
                "pipeline",
                record={"resolution": config["sample_size"], "channels": config["in_channels"]},
            )
        if (path / SAMPLES_RECORD).is_file():
            record = read_record(path / SAMPLES_RECORD, ("num_images", "resolution", "channels"))
            return cls(spec, "samples", record=record)
        if (path / GRID_FILE).is_file() and any(is_sample_file(entry.name) for entry in path.iterdir()):
            # Read as an image folder, it would count the grid (and any stale image) as samples.
            raise SpecError(
                f"{spec!r} holds pipelines/sample.py images but no {SAMPLES_RECORD}, so it is no complete samples "
                "folder; sample it again"
            )
        return cls(spec, "dataset")

    def rows(self, args: argparse.Namespace) -> datasets.Dataset:
        """A dataset SPEC's images in --split, loaded (and every file of a folder checked) once."""
        key = (args.split, args.image_column)
        if key not in self.loaded:
            self.loaded[key] = load_image_dataset(self.spec, split=args.split, image_column=args.image_column)
        return self.loaded[key]

    def geometry(self, args: argparse.Namespace) -> tuple[int, int | None]:
        """(resolution, channels) of the SPEC: a model's, a statistics file's, or a dataset's first image's."""
        if self.kind == "dataset":
            rows = self.rows(args)
            if len(rows) == 0:
                raise SpecError(f"dataset {self.spec!r} has no images in split {args.split!r}")
            image = rows[0]["image"]
            return min(image.size), 1 if image.mode in GREY_MODES else 3
        resolution = self.record.get("resolution")
        if not isinstance(resolution, int):
            raise SpecError(
                f"{self.spec!r}: only square images are supported, its resolution is {resolution!r}"
            )
        return resolution, self.record.get("channels")


def resolve_geometry(args: argparse.Namespace, real: Source, fake: Source | None) -> tuple[int, int]:
    """--resolution/--channels, else the model's (a pipeline or samples folder: generated images are measured at
    the size they were generated, the real side's model first), else the real side's (its statistics file's or
    its data's own). The fake side's data never sets it: a folder compared with the real data is resized to it."""
    resolution, channels = args.resolution, args.channels
    models = [
        source for source in (real, fake) if source is not None and source.kind in ("pipeline", "samples")
    ]
    for source in [*models, real]:
        if resolution is not None and channels is not None:
            break
        own_resolution, own_channels = source.geometry(args)
        resolution = resolution if resolution is not None else own_resolution
        channels = channels if channels is not None else own_channels
    return resolution, channels


def classifier_dataset(
    args: argparse.Namespace, real: Source, fake: Source | None
) -> tuple[str | None, str | None]:
    """(dataset, image_column) the feature classifier is trained on: --classifier_dataset, else, the real side
    first, a labelled dataset SPEC or the dataset a classifier statistics file was made with, else an unlabelled
    dataset SPEC (which the classifier then refuses, naming it)."""
    if args.classifier_dataset is not None:
        return args.classifier_dataset, args.image_column
    sides = [source for source in (real, fake) if source is not None]
    for source in sides:
        if source.kind == "dataset" and "label" in source.rows(args).column_names:
            return source.spec, args.image_column
        recorded = source.record.get("feature_extractor", {}) if source.kind == "statistics" else {}
        if recorded.get("kind") == "classifier":
            return recorded["dataset"], recorded.get("image_column")
    for source in sides:
        if source.kind == "dataset":
            return source.spec, args.image_column
    return None, None


def read_record(file: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object that holds `keys`, or one SpecError line naming the file."""
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpecError(f"{str(file)!r} cannot be read as JSON: {error}") from None
    missing = [key for key in keys if not isinstance(record, dict) or key not in record]
    if missing:
        raise SpecError(f"{str(file)!r} lacks {', '.join(missing)}")
    return record


def check_compatible(source: Source, extractor: FeatureExtractor, resolution: int, channels: int) -> None:
    """A statistics file is usable only with the same feature extractor, weights and image geometry."""
    recorded_geometry = (source.record.get("resolution"), source.record.get("channels"))
    if recorded_geometry != (resolution, channels):
        raise SpecError(
            f"{source.spec!r} holds statistics of {recorded_geometry[1]}-channel {recorded_geometry[0]}px images, "
            f"this run compares {channels}-channel {resolution}px images"
        )
    recorded = source.record.get("feature_extractor", {})
    current = extractor.provenance()
    for key in ("kind", "weights_sha256", "antialias"):
        if recorded.get(key) != current.get(key):
            raise SpecError(
                f"{source.spec!r} was computed with feature extractor {key}={recorded.get(key)!r}, this run uses "
                f"{current.get(key)!r}; recompute it with `dia-diffusion ref` or match --feature and the weights"
            )
