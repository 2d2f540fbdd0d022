"""Measuring image sets in a feature space — real data and pipeline samples — and the evaluator training calls.

Features are computed batch by batch on the model's device; when several accelerate processes run, each takes a
contiguous share of the images and the features are gathered back in index order, so every process ends with
the same numbers as a single process would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from dia_diffusion.data.image_datasets import load_image_dataset, to_uint8_images
from dia_diffusion.evaluation.class_accuracy import class_accuracy
from dia_diffusion.evaluation.feature_extractors import (
    FEATURE_KINDS,
    ClassifierFeatures,
    FeatureExtractor,
    build_feature_extractor,
)
from dia_diffusion.evaluation.frechet import FeatureStatistics, frechet_distance_between
from dia_diffusion.pipelines.class_conditional import EVERY_CLASS, ClassConditionalPipeline, ClassSampling
from dia_diffusion.pipelines.sampling import generate, process_state, stock_pipeline

# The evaluator compares samples with (at most) this many training images, taken in dataset order.
REFERENCE_SAMPLES = 10_000
# KID's standard estimate (Bińkowski et al. 2018, torch-fidelity defaults): 100 subsets of 1000 samples.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
INCEPTION_SCORE_SPLITS = 10
# torchmetrics warns that KID and IS keep every feature in memory; here the features are in memory already.
FEATURE_BUFFER_WARNING = ".*will save all extracted features in buffer.*"


def dataset_batches(
    dataset: datasets.Dataset, indices: Sequence[int], resolution: int, channels: int, batch_size: int
) -> Iterable[torch.Tensor]:
    """uint8 images [B, channels, resolution, resolution] of the dataset rows `indices`, batch by batch."""
    for start in range(0, len(indices), batch_size):
        rows = dataset[list(indices[start : start + batch_size])]
        yield to_uint8_images(rows["image"], resolution, channels)


@torch.no_grad()
def features_of(
    extractor: FeatureExtractor, batches: Iterable[torch.Tensor], device: torch.device, progress: tqdm
) -> np.ndarray:
    """float32 features [N, D] of uint8 image batches (empty [0, 0] when there are none)."""
    chunks = []
    for images in batches:
        chunks.append(extractor(images.to(device)).float().cpu().numpy())
        progress.update(images.shape[0])
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def features_across_processes(
    count: int, features_for: Callable[[list[int], tqdm], np.ndarray], state: Any, description: str
) -> np.ndarray:
    """Features of items 0..count-1, each process computing a contiguous share; all processes get all of them."""
    if count < 1:
        raise ValueError(f"{description}: there are no images to measure")
    with (
        state.split_between_processes(list(range(count))) as indices,
        tqdm(total=len(indices), desc=description, unit="img", disable=not state.is_main_process) as progress,
    ):
        local = features_for(indices, progress)
    shares = gather_object([local])
    return np.concatenate([share for share in shares if share.shape[0] > 0])


def dataset_features(
    dataset: datasets.Dataset,
    extractor: FeatureExtractor,
    resolution: int,
    channels: int,
    num_samples: int,
    batch_size: int,
    state: Any,
    device: torch.device,
) -> np.ndarray:
    """Features of the first `num_samples` rows of a dataset (all of them when it is smaller)."""
    count = min(num_samples, len(dataset))
    return features_across_processes(
        count,
        lambda indices, progress: features_of(
            extractor, dataset_batches(dataset, indices, resolution, channels, batch_size), device, progress
        ),
        state,
        "real images",
    )


def generated_features(
    pipeline: DiffusionPipeline,
    extractor: FeatureExtractor,
    num_samples: int,
    seed: int,
    batch_size: int,
    num_inference_steps: int,
    eta: float | None,
    state: Any,
    classes: ClassSampling = EVERY_CLASS,
) -> np.ndarray:
    """Features of images 0..num_samples-1 generated with per-sample seeds `seed + i` (and, from a class-conditional
    pipeline, the class `classes` gives image i)."""
    device = pipeline.unet.device

    def features_for(indices: list[int], progress: tqdm) -> np.ndarray:
        images = generate(pipeline, indices, seed, batch_size, num_inference_steps, eta, classes)
        return features_of(extractor, (batch for _, batch in images), device, progress)

    return features_across_processes(num_samples, features_for, state, "generating")


def kernel_inception_distance(
    real_features: np.ndarray, fake_features: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over subsets) with torchmetrics, on Inception pool features; subsets are drawn with `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(KID_SUBSET_SIZE, len(real_features), len(fake_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FEATURE_BUFFER_WARNING)
        metric = KernelInceptionDistance(
            feature=torch.nn.Identity(), subsets=KID_SUBSETS, subset_size=subset_size
        )
    metric.update(torch.from_numpy(real_features), real=True)
    metric.update(torch.from_numpy(fake_features), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """IS (mean, std over 10 splits) with torchmetrics, on Inception's unbiased logits; the shuffle uses `seed`."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FEATURE_BUFFER_WARNING)
        metric = InceptionScore(feature=torch.nn.Identity(), splits=INCEPTION_SCORE_SPLITS)
    metric.update(logits.float().cpu())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class PipelineEvaluator:
    """Fréchet distance between a pipeline's DDIM samples and the training data, for use during training.

    Called with a pipeline, it generates `num_samples` images (image i seeded `seed + i`, DDIM with η = 0 and
    `num_inference_steps` steps), and returns `{metric_key: distance}` with metric_key "fd_classifier",
    "fd_dinov2" or "fid". Resolution and channels come from `pipeline.unet.config`. The reference statistics (at
    most 10,000 training images) and the feature extractor are built on the first call and kept. With an
    accelerator of several processes, call it on every process: generation is split and all get the same result.
    """

    def __init__(
        self,
        dataset: str,
        feature: str = "classifier",
        num_samples: int = 500,
        num_inference_steps: int = 50,
        seed: int = 0,
        batch_size: int = 64,
        image_column: str | None = None,
        cache_dir: str | None = None,
        accelerator: Any = None,
        inception_weights: str | None = None,
        dinov2_model: str | None = None,
        guidance_scale: float = 1.0,
    ):
        if feature not in FEATURE_KINDS:
            raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {feature!r}")
        if num_samples < 2:
            raise ValueError(
                f"num_samples must be at least 2 (a covariance needs two samples), got {num_samples}"
            )
        for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.dataset = dataset
        self.feature = feature
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.batch_size = batch_size
        self.image_column = image_column
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.inception_weights = inception_weights
        self.dinov2_model = dinov2_model
        # A class-conditional model is sampled class-balanced (image i shows class i mod K) with this guidance.
        self.classes = ClassSampling(guidance_scale=guidance_scale)
        self.state = accelerator if accelerator is not None else process_state()
        self.extractor: FeatureExtractor | None = None
        self.reference: FeatureStatistics | None = None
        self.geometry: tuple[int, int] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        """How the metric is computed (feature extractor, weights sha256, classifier accuracy, reference size)."""
        if self.extractor is None or self.reference is None:
            raise RuntimeError("the evaluator has not been called yet")
        return {
            "metric": self.extractor.metric_key,
            "metric_name": self.extractor.metric_name,
            "feature_extractor": self.extractor.provenance(),
            "reference": {"dataset": self.dataset, "split": "train", "num_samples": self.reference.count},
            "generated": {
                "num_samples": self.num_samples,
                "scheduler": "ddim",
                "eta": 0.0,
                "num_inference_steps": self.num_inference_steps,
                "seed": self.seed,
                # A class-conditional model: every class in turn, with this classifier-free guidance.
                "guidance_scale": self.classes.guidance_scale,
            },
        }

    def prepare(self, resolution: int, channels: int, device: torch.device) -> None:
        """Builds the feature extractor and the reference statistics for this geometry (first call only)."""
        options: dict[str, Any] = {"inception_weights": self.inception_weights}
        if self.dinov2_model is not None:
            options["dinov2_model"] = self.dinov2_model
        # The main process trains and caches the classifier first; the others then load it from the cache.
        with self.state.main_process_first():
            self.extractor = build_feature_extractor(
                self.feature,
                resolution,
                channels,
                classifier_dataset=self.dataset,
                image_column=self.image_column,
                cache_dir=self.cache_dir,
                device=device,
                **options,
            )
            rows = load_image_dataset(self.dataset, split="train", image_column=self.image_column)
        features = dataset_features(
            rows, self.extractor, resolution, channels, REFERENCE_SAMPLES, self.batch_size, self.state, device
        )
        self.reference = FeatureStatistics.of(features)
        self.geometry = (resolution, channels)

    def __call__(self, pipeline: DiffusionPipeline) -> dict[str, float]:
        unet = pipeline.unet
        resolution, channels = unet.config.sample_size, unet.config.in_channels
        if not isinstance(resolution, int):
            raise ValueError(f"the evaluator needs square images; unet.config.sample_size is {resolution!r}")
        if self.geometry != (resolution, channels):
            self.prepare(resolution, channels, unet.device)
        sampler = stock_pipeline(unet, pipeline.scheduler.config, "ddim")
        features = generated_features(
            sampler,
            self.extractor,
            self.num_samples,
            self.seed,
            self.batch_size,
            self.num_inference_steps,
            None,
            self.state,
            self.classes,
        )
        result = {
            self.extractor.metric_key: frechet_distance_between(
                self.reference, FeatureStatistics.of(features)
            )
        }
        if isinstance(sampler, ClassConditionalPipeline) and isinstance(self.extractor, ClassifierFeatures):
            labels = self.classes.labels(list(range(self.num_samples)), sampler.num_classes)
            result["class_accuracy"] = class_accuracy(self.extractor, features, labels)["class_accuracy"]
        return result
