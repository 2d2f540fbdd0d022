"""`dia-diffusion fid` and `dia-diffusion ref`: Fréchet distances that record how they were computed.

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
import numpy as np
import torch

from dia_diffusion.data import load_image_dataset, open_image_file, to_uint8_images
from dia_diffusion.evaluation import (
    dataset_features,
    features_across_processes,
    features_of,
    generated_features,
    inception_score,
    kernel_inception_distance,
)
from dia_diffusion.feature_extractors import (
    DEFAULT_DINOV2_MODEL,
    FEATURE_KINDS,
    FeatureExtractor,
    build_feature_extractor,
)
from dia_diffusion.frechet import FeatureStatistics, frechet_distance_between
from dia_diffusion.image_modes import GREY_MODES
from dia_diffusion.output_files import check_output_path
from dia_diffusion.sampling import (
    GRID_FILE,
    SAMPLES_RECORD,
    SCHEDULERS,
    is_sample_file,
    load_pipeline,
    pipeline_eta,
    process_state,
    sample_file_name,
)

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


def samples_folder_features(
    source: Source,
    extractor: FeatureExtractor,
    args: argparse.Namespace,
    resolution: int,
    channels: int,
    state: Any,
) -> np.ndarray:
    folder = Path(source.spec).expanduser()
    count = min(args.num_samples, int(source.record["num_images"]))
    missing = [index for index in range(count) if not (folder / sample_file_name(index)).is_file()]
    if missing:
        raise SpecError(
            f"samples folder {source.spec!r} lacks {sample_file_name(missing[0])} ({len(missing)} missing)"
        )

    def batches(indices: list[int]):
        for start in range(0, len(indices), args.batch_size):
            files = [folder / sample_file_name(index) for index in indices[start : start + args.batch_size]]
            yield to_uint8_images([open_image_file(file) for file in files], resolution, channels)

    return features_across_processes(
        count,
        lambda indices, progress: features_of(extractor, batches(indices), state.device, progress),
        state,
        "samples",
    )


def measure(
    source: Source,
    extractor: FeatureExtractor,
    args: argparse.Namespace,
    resolution: int,
    channels: int,
    state: Any,
) -> tuple[FeatureStatistics, np.ndarray | None, dict[str, Any]]:
    """(statistics, per-image features or None, record of what was measured) for one SPEC."""
    if source.kind == "statistics":
        check_compatible(source, extractor, resolution, channels)
        record = {
            "spec": source.spec,
            "kind": "statistics",
            "num_samples": source.statistics.count,
            "computed_from": source.record.get("source"),
        }
        return source.statistics, None, record
    if source.kind == "pipeline":
        pipeline = load_pipeline(source.spec, args.scheduler).to(state.device)
        features = generated_features(
            pipeline,
            extractor,
            args.num_samples,
            args.seed,
            args.batch_size,
            args.num_inference_steps,
            args.eta,
            state,
        )
        record = {
            "scheduler": args.scheduler,
            "num_inference_steps": args.num_inference_steps,
            "eta": pipeline_eta(pipeline, args.eta),
            "seed": args.seed,
        }
    elif source.kind == "samples":
        features = samples_folder_features(source, extractor, args, resolution, channels, state)
        record = {
            key: source.record.get(key)
            for key in ("model", "scheduler", "num_inference_steps", "eta", "seed")
        }
    else:
        features = dataset_features(
            source.rows(args),
            extractor,
            resolution,
            channels,
            args.num_samples,
            args.batch_size,
            state,
            state.device,
        )
        record = {"split": args.split}
    if features.shape[0] < 2:
        raise SpecError(f"{source.spec!r} holds {features.shape[0]} image; a covariance needs at least 2")
    record = {"spec": source.spec, "kind": source.kind, "num_samples": int(features.shape[0]), **record}
    return FeatureStatistics.of(features), features, record


def prepare(
    args: argparse.Namespace, state: Any, real: Source, fake: Source | None = None
) -> tuple[FeatureExtractor, int, int]:
    if args.num_samples < 2:
        raise SpecError(
            f"--num_samples must be at least 2 (a covariance needs two samples), got {args.num_samples}"
        )
    for flag, value in (("--batch_size", args.batch_size), ("--resolution", args.resolution)):
        if value is not None and value < 1:
            raise SpecError(f"{flag} must be positive, got {value}")
    resolution, channels = resolve_geometry(args, real, fake)
    dataset, image_column = (
        classifier_dataset(args, real, fake) if args.feature == "classifier" else (None, None)
    )
    if args.feature == "classifier" and dataset is None:
        raise SpecError(
            "--feature classifier needs a labelled dataset: give one as a SPEC or as --classifier_dataset"
        )
    with state.main_process_first():
        extractor = build_feature_extractor(
            args.feature,
            resolution,
            channels,
            classifier_dataset=dataset,
            image_column=image_column,
            cache_dir=args.cache_dir,
            inception_weights=args.inception_weights,
            dinov2_model=args.dinov2_model,
            device=state.device,
        )
    return extractor, resolution, channels


def compute_fid(args: argparse.Namespace, state: Any) -> dict[str, Any]:
    """Everything `fid` reports: the distance, KID and IS where they apply, and how it was all computed."""
    real, fake = Source.open(args.real), Source.open(args.fake)
    extractor, resolution, channels = prepare(args, state, real, fake)
    real_statistics, real_features, real_record = measure(real, extractor, args, resolution, channels, state)
    fake_statistics, fake_features, fake_record = measure(fake, extractor, args, resolution, channels, state)
    provenance = extractor.provenance()
    # The distance is stored under its metric's own key ("fid", "fd_dinov2", "fd_classifier"), as the evaluator
    # returns it during training; "metric" names that key.
    result: dict[str, Any] = {
        "metric": extractor.metric_key,
        "metric_name": extractor.metric_name,
        extractor.metric_key: frechet_distance_between(real_statistics, fake_statistics),
        "feature_extractor": provenance,
        "antialias": provenance["antialias"],
        "resolution": resolution,
        "channels": channels,
        "real": real_record,
        "fake": fake_record,
    }
    if extractor.kind == "inception":
        if real_features is not None and fake_features is not None:
            result["kid"], result["kid_std"] = kernel_inception_distance(real_features, fake_features)
        if fake_features is not None:
            logits = extractor.logits(torch.from_numpy(fake_features).to(state.device))
            result["inception_score"], result["inception_score_std"] = inception_score(logits)
    return result


def describe_extractor(provenance: dict[str, Any]) -> str:
    """One line naming the feature network and its weights (and, for the classifier, its accuracy)."""
    line = f"features: {provenance['network']}, weights sha256 {provenance['weights_sha256'][:16]}…"
    if provenance["kind"] == "classifier":
        line += (
            f", trained on {provenance['dataset']}, held-out accuracy {100 * provenance['accuracy']:.1f}% "
            f"({provenance['held_out_images']} images), cached at {provenance['weights']}"
        )
    return line


def describe(result: dict[str, Any]) -> str:
    """The human-readable report: the number, then what it was measured with and on."""
    lines = [f"{result['metric_name']}: {result[result['metric']]:.4f}"]
    if "kid" in result:
        lines.append(f"KID: {result['kid']:.6f} ± {result['kid_std']:.6f}")
    if "inception_score" in result:
        lines.append(f"IS (fake): {result['inception_score']:.3f} ± {result['inception_score_std']:.3f}")
    lines.append(describe_extractor(result["feature_extractor"]))
    for side in ("real", "fake"):
        record = result[side]
        detail = ", ".join(
            f"{key} {record[key]}"
            for key in ("split", "scheduler", "num_inference_steps", "eta", "seed")
            if key in record
        )
        lines.append(
            f"{side}: {record['spec']} ({record['kind']}), {record['num_samples']} images{', ' + detail if detail else ''}"
        )
    geometry = f"images: {result['channels']}x{result['resolution']}x{result['resolution']}"
    if result["antialias"] is not None:
        geometry += f", resized with antialias={result['antialias']}"
    lines.append(geometry)
    return "\n".join(lines)


def run_fid(args: argparse.Namespace) -> int:
    state = process_state()
    result = compute_fid(args, state)
    if state.is_main_process:
        print(json.dumps(result) if args.json else describe(result))
    return 0


def run_ref(args: argparse.Namespace) -> int:
    state = process_state()
    if not args.out.endswith(".npz"):
        raise SpecError(f"--out must end in .npz, got {args.out!r}")
    check_output_path(Path(args.out).expanduser(), "--out")
    source = Source.open(args.spec)
    if source.kind == "statistics":
        raise SpecError(f"{args.spec!r} already holds statistics; give the images they should come from")
    extractor, resolution, channels = prepare(args, state, source)
    statistics, _, record = measure(source, extractor, args, resolution, channels, state)
    if state.is_main_process:
        metadata = {
            "feature_extractor": extractor.provenance(),
            "metric": extractor.metric_key,
            "resolution": resolution,
            "channels": channels,
            "source": record,
        }
        statistics.save(args.out, metadata)
        print(
            f"wrote {args.out}: {extractor.metric_name} statistics of {statistics.count} images of {args.spec}"
        )
        print(describe_extractor(metadata["feature_extractor"]))
    return 0


def add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feature",
        choices=FEATURE_KINDS,
        default="inception",
        help="feature space: inception (FID), dinov2, or classifier (FD (classifier features))",
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=10_000,
        help="images generated from a pipeline, and the most read from a dataset or folder",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--split", default="train", help="dataset split read from a dataset SPEC")
    parser.add_argument("--image_column", default=None, help="image column of a hub or save_to_disk dataset")
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: the model's, else the real side's own"
    )
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="sampler for a pipeline SPEC")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="image i of a pipeline SPEC is seeded seed + i")
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="weights-inception-2015-12-05-6726825d.pth (default: $DIA_DIFFUSION_INCEPTION_WEIGHTS, "
        "then the torch hub cache, then a download)",
    )
    parser.add_argument("--dinov2_model", default=DEFAULT_DINOV2_MODEL, help="hub name or local folder")
    parser.add_argument(
        "--classifier_dataset",
        default=None,
        help="labelled dataset the feature classifier trains on (default: the labelled dataset SPEC, the real "
        "side first)",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="where classifiers are cached (default ~/.cache/dia_diffusion)"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    fid = subparsers.add_parser(
        "fid",
        help="Fréchet distance between two image sets (FID with Inception features)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fid.add_argument("--real", required=True, help=SPEC_HELP)
    fid.add_argument("--fake", required=True, help=SPEC_HELP)
    add_measurement_arguments(fid)
    fid.add_argument(
        "--json", action="store_true", help="print one JSON object recording how it was computed"
    )
    fid.set_defaults(func=run_fid)

    ref = subparsers.add_parser(
        "ref",
        help="compute and cache the feature statistics of real data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ref.add_argument("spec", help=SPEC_HELP)
    ref.add_argument("--out", required=True, help="statistics file to write (.npz)")
    add_measurement_arguments(ref)
    ref.set_defaults(func=run_ref)
