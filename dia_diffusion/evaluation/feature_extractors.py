"""The feature spaces a Fréchet distance is measured in, and where their weights come from.

Every extractor takes uint8 images [N, C, H, W] (C = 1 or 3) and returns float features [N, D]; each one
describes itself (`provenance`) so a reported number always says which network and which weights made it.

- `inception`: torchmetrics' InceptionV3 (torch-fidelity's port of the TF 2015-12-05 graph every FID paper uses),
  2048-d pool features, `antialias=False` so the 299×299 resize matches TF/torch-fidelity FID. The metric is FID.
- `dinov2`: transformers' Dinov2Model, CLS token of the last layer at 224×224 (Stein et al. 2023, "Exposing
  flaws of generative model evaluation metrics"). The metric is FD (DINOv2 features).
- `classifier`: the project's small classifier trained on the same dataset (`feature_classifier.py`).
  The metric is FD (classifier features) — never FID.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dia_diffusion.evaluation.feature_classifier import TrainedClassifier, load_or_train_classifier
from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.file_digests import file_sha256, folder_weights_sha256

FEATURE_KINDS = ("inception", "dinov2", "classifier")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
INCEPTION_WEIGHTS_ENV = "DIA_DIFFUSION_INCEPTION_WEIGHTS"
DEFAULT_DINOV2_MODEL = "facebook/dinov2-large"
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """The weights a feature extractor needs are not on this machine; the message says which file and from where."""


def inception_cache_path() -> Path:
    """Where torch-fidelity (and so torchmetrics) keeps the file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(weights_path: str | Path | None = None, allow_download: bool = True) -> Path:
    """The Inception weights file: `weights_path`, else $DIA_DIFFUSION_INCEPTION_WEIGHTS, else the torch hub cache,
    else a download into that cache. Raises MissingWeightsError, and never substitutes another network."""
    for source, candidate in (
        ("--inception_weights", weights_path),
        (INCEPTION_WEIGHTS_ENV, os.environ.get(INCEPTION_WEIGHTS_ENV) or None),
    ):
        if candidate is not None:
            if not Path(candidate).is_file():
                raise MissingWeightsError(
                    f"{source}: Inception weights file {str(candidate)!r} does not exist"
                )
            return Path(candidate)
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    hint = (
        f"FID needs torch-fidelity's Inception weights {INCEPTION_WEIGHTS_FILE} (~91 MB, Apache-2.0) from "
        f"{INCEPTION_WEIGHTS_URL}; download it where you have internet and pass --inception_weights PATH, set "
        f"{INCEPTION_WEIGHTS_ENV}=PATH, or put it at {cached}"
    )
    if not allow_download:
        raise MissingWeightsError(f"{hint} (downloads are disabled)")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), progress=False)
    except OSError as error:
        raise MissingWeightsError(f"{hint} (download failed: {error})") from error
    return cached


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images [N, 1, H, W] → [N, 3, H, W]; both ImageNet-trained networks take RGB."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(nn.Module):
    """FID's InceptionV3 pool features, built exactly as torchmetrics' FrechetInceptionDistance(feature=2048,
    antialias=False, feature_extractor_weights_path=...) builds them."""

    kind = "inception"
    metric_key = "fid"
    metric_name = "FID"

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights_path = Path(weights_path)
        try:
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(self.weights_path),
                antialias=False,
            )
        # A file cut short (a partial download) fails with OSError EINVAL past the zip header.
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as error:
            raise ValueError(
                f"{str(self.weights_path)!r} is not torch-fidelity's {INCEPTION_WEIGHTS_FILE} ({first_line(error)}): "
                f"a partial download or another file; download it again from {INCEPTION_WEIGHTS_URL}"
            ) from None
        self.weights_sha256 = file_sha256(self.weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(as_rgb(images))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """torch-fidelity's "logits_unbiased" (pool features × fc weight, no bias): what the Inception Score uses."""
        return features.to(self.network.fc.weight) @ self.network.fc.weight.T

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "network": "InceptionV3, TF 2015-12-05 graph (torch-fidelity port, via torchmetrics)",
            "layer": "pool3, 2048-d",
            "weights": str(self.weights_path),
            "weights_sha256": self.weights_sha256,
            "antialias": False,
            "input": "uint8 RGB, bilinear resize to 299x299 as TF1 does it",
        }


class Dinov2Features(nn.Module):
    """DINOv2 CLS-token features: RGB, bicubic resize to 224×224, ImageNet normalisation."""

    kind = "dinov2"
    metric_key = "fd_dinov2"
    metric_name = "FD (DINOv2 features)"

    def __init__(self, model: str = DEFAULT_DINOV2_MODEL):
        super().__init__()
        from transformers import Dinov2Model

        folder = Path(model) if Path(model).is_dir() else self.download(model)
        self.model_name = model
        try:
            self.network = Dinov2Model.from_pretrained(folder).eval().requires_grad_(False)
        except OSError as error:
            raise MissingWeightsError(
                f"--dinov2_model {model!r} cannot be loaded: {first_line(error)}"
            ) from None
        self.weights_sha256 = folder_weights_sha256(folder)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def download(model: str) -> Path:
        import huggingface_hub

        try:
            return Path(huggingface_hub.snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))
        except (OSError, ValueError) as error:
            raise MissingWeightsError(
                f"--dinov2_model: cannot load DINOv2 model {model!r}: it is neither a local folder saved by "
                f"transformers nor reachable on the Hugging Face hub from this machine ({type(error).__name__}); "
                "download it where you have internet and pass its folder"
            ) from error

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = as_rgb(images).to(self.mean) / 255.0
        pixels = F.interpolate(
            pixels,
            size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        ).clamp(0.0, 1.0)
        return self.network(pixel_values=(pixels - self.mean) / self.std).pooler_output

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "network": "DINOv2 (transformers Dinov2Model)",
            "layer": f"CLS token after the final layer norm, {self.network.config.hidden_size}-d",
            "weights": self.model_name,
            "weights_sha256": self.weights_sha256,
            "antialias": True,
            "input": f"RGB, bicubic resize to {DINOV2_RESOLUTION}x{DINOV2_RESOLUTION}, ImageNet mean/std",
        }


class ClassifierFeatures(nn.Module):
    """Pooled features of the project's classifier trained on the dataset itself."""

    kind = "classifier"
    metric_key = "fd_classifier"
    metric_name = "FD (classifier features)"

    def __init__(self, classifier: TrainedClassifier):
        super().__init__()
        self.classifier = classifier
        self.network = classifier.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.classifier.channels, self.classifier.resolution, self.classifier.resolution)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"the feature classifier was trained on {'x'.join(map(str, expected))} images, "
                f"got {'x'.join(map(str, images.shape[1:]))}"
            )
        return self.network.features(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's class scores from the pooled features `forward` returns."""
        return self.network.head(features)

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "network": "dia_diffusion FeatureClassifier (3 conv stages, trained on the dataset)",
            "layer": f"global average pool, {self.network.feature_dimension}-d",
            "weights": str(self.classifier.path),
            "weights_sha256": self.classifier.sha256,
            "antialias": None,
            "input": f"uint8, {self.classifier.channels}x{self.classifier.resolution}x{self.classifier.resolution}",
            "dataset": self.classifier.dataset,
            "image_column": self.classifier.image_column,
            "accuracy": self.classifier.accuracy,
            "held_out_images": self.classifier.held_out_images,
        }


FeatureExtractor = InceptionFeatures | Dinov2Features | ClassifierFeatures


def build_feature_extractor(
    kind: str,
    resolution: int,
    channels: int,
    classifier_dataset: str | None = None,
    image_column: str | None = None,
    cache_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    dinov2_model: str = DEFAULT_DINOV2_MODEL,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """The extractor of `kind`, in eval mode on `device`; the classifier trains (and is cached) on first use."""
    if kind == "inception":
        extractor = InceptionFeatures(resolve_inception_weights(inception_weights))
    elif kind == "dinov2":
        extractor = Dinov2Features(dinov2_model)
    elif kind == "classifier":
        if classifier_dataset is None:
            raise ValueError(
                "classifier features need the labelled dataset the classifier is trained on: "
                "give --real as a dataset spec, or --classifier_dataset SPEC"
            )
        classifier = load_or_train_classifier(
            classifier_dataset,
            resolution,
            channels,
            image_column=image_column,
            cache_dir=cache_dir,
            device=device,
        )
        extractor = ClassifierFeatures(classifier)
    else:
        raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {kind!r}")
    return extractor.to(device).eval()
