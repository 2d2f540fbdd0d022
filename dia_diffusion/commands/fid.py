"""`dia-diffusion fid` and `dia-diffusion ref`: Fréchet distances that record how they were computed.

What each side (a SPEC) may be is described in `fid_sources.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dia_diffusion.commands.fid_sources import (
    SPEC_HELP,
    Source,
    SpecError,
    check_compatible,
    classifier_dataset,
    resolve_geometry,
)
from dia_diffusion.data.image_datasets import open_image_file, to_uint8_images
from dia_diffusion.evaluation.class_accuracy import class_accuracy
from dia_diffusion.evaluation.feature_extractors import (
    DEFAULT_DINOV2_MODEL,
    FEATURE_KINDS,
    ClassifierFeatures,
    FeatureExtractor,
    build_feature_extractor,
)
from dia_diffusion.evaluation.frechet import FeatureStatistics, frechet_distance_between
from dia_diffusion.evaluation.pipeline_evaluator import (
    dataset_features,
    features_across_processes,
    features_of,
    generated_features,
    inception_score,
    kernel_inception_distance,
)
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline, ClassSampling
from dia_diffusion.pipelines.sampling import (
    SCHEDULERS,
    load_pipeline,
    pipeline_eta,
    process_state,
    sample_file_name,
)
from dia_diffusion.runtime.folder_lock import lock_output
from dia_diffusion.runtime.output_files import check_output_path


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
    labels = None
    if source.kind == "pipeline":
        pipeline = load_pipeline(source.spec, args.scheduler).to(state.device)
        classes = ClassSampling(guidance_scale=args.guidance_scale)
        features = generated_features(
            pipeline,
            extractor,
            args.num_samples,
            args.seed,
            args.batch_size,
            args.num_inference_steps,
            args.eta,
            state,
            classes,
        )
        record = {
            "scheduler": args.scheduler,
            "num_inference_steps": args.num_inference_steps,
            "eta": pipeline_eta(pipeline, args.eta),
            "seed": args.seed,
        }
        if isinstance(pipeline, ClassConditionalPipeline):
            labels = classes.labels(list(range(args.num_samples)), pipeline.num_classes)
            record.update(
                guidance_scale=args.guidance_scale, classes="every class in turn (image i: i mod K)"
            )
    elif source.kind == "samples":
        features = samples_folder_features(source, extractor, args, resolution, channels, state)
        record = {
            key: source.record.get(key)
            for key in ("model", "scheduler", "num_inference_steps", "eta", "seed", "guidance_scale")
            if key in source.record
        }
        labels = source.record.get("class_labels")
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
    if labels is not None and isinstance(extractor, ClassifierFeatures):
        record.update(class_accuracy(extractor, features, labels[: features.shape[0]]))
    elif labels is not None:
        # Only a classifier of the dataset's classes can say which class it sees.
        record["class_accuracy"] = None
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
    if "class_accuracy" in result["fake"]:
        accuracy = result["fake"]["class_accuracy"]
        lines.append(
            "class accuracy (fake): not measured; it needs --feature classifier"
            if accuracy is None
            else f"class accuracy (fake): {100 * accuracy:.1f}% of the samples show the class they were asked for, "
            "by the feature classifier"
        )
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
    out = Path(args.out).expanduser()
    check_output_path(out, "--out")
    # Before the statistics are computed: a second `ref` into the same file is refused at once.
    out_lock = lock_output(out.absolute(), "--out", "dia-diffusion ref", state)
    try:
        write_reference(args, state)
    finally:
        if out_lock is not None:
            out_lock.release()
    return 0


def write_reference(args: argparse.Namespace, state: Any) -> None:
    """`ref`'s work, once --out is checked and locked."""
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
        "--guidance_scale",
        type=float,
        default=1.0,
        help="class-conditional pipeline SPEC: classifier-free guidance (its images show every class in turn)",
    )
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
