"""The feature spaces a Fréchet distance is measured in: each distance grows as the fake images are corrupted, and
where the Inception and DINOv2 weights come from, with the one error when they are missing.

Inception and DINOv2 run here with random weights of the right layout: that tests the plumbing only, and such a
number is never a result.
"""

import hashlib
import math
import urllib.error
from pathlib import Path

import pytest
import torch
from fid_cli import fid_json, run_cli, the_error
from torch import nn

from dia_diffusion.data.image_datasets import load_image_dataset, to_uint8_images
from dia_diffusion.evaluation.feature_classifier import save_reproducibly
from dia_diffusion.evaluation.feature_extractors import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    Dinov2Features,
    InceptionFeatures,
    MissingWeightsError,
    build_feature_extractor,
    resolve_inception_weights,
)
from dia_diffusion.evaluation.frechet import FeatureStatistics, frechet_distance_between
from dia_diffusion.runtime.file_digests import file_sha256

CORRUPTION_LEVELS = (0.0, 0.1, 0.25, 0.5)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A file laid out like torch-fidelity's Inception weights (the state dict of FeatureExtractorInceptionV3,
    which its constructor loads with torch.load), holding random values."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch:
        # Build the network without its pretrained file: nothing to download, nothing to load.
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(
            inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
        )
        network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            # Variance-preserving initialisation keeps the 2048-d features O(1) through ~100 layers.
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception-weights.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Real images (train split) and, as the uncorrupted "fake" set, other real images (test split); 8x8 grey."""
    real = load_image_dataset("digits", split="train")[:200]["image"]
    fake = load_image_dataset("digits", split="test")[:200]["image"]
    return to_uint8_images(real, 8, 1), to_uint8_images(fake, 8, 1)


def corrupt(images: torch.Tensor, level: float) -> torch.Tensor:
    """Blends the images towards fixed uniform noise: level 0 leaves them alone, 0.5 is half noise."""
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0))
    return ((1 - level) * images.double() + level * noise.double()).round().to(torch.uint8)


def distances_under_corruption(extractor: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> list[float]:
    with torch.no_grad():
        reference = FeatureStatistics.of(extractor(real).double().numpy())
        return [
            frechet_distance_between(
                reference, FeatureStatistics.of(extractor(corrupt(fake, level)).double().numpy())
            )
            for level in CORRUPTION_LEVELS
        ]


def assert_strictly_increasing(distances: list[float]) -> None:
    assert all(later > earlier for earlier, later in zip(distances, distances[1:])), distances


def test_classifier_distance_grows_with_corruption(digit_images, cache_dir):
    extractor = build_feature_extractor("classifier", 8, 1, classifier_dataset="digits", cache_dir=cache_dir)
    assert extractor.classifier.accuracy > 0.9
    real, fake = digit_images
    distances = distances_under_corruption(extractor, real, fake)
    assert_strictly_increasing(distances)
    assert distances[0] < 0.1 * distances[-1], (
        "two sets of real digits must be far closer than digits and noise"
    )


def test_dinov2_distance_grows_with_corruption(digit_images, tiny_dinov2):
    extractor = Dinov2Features(str(tiny_dinov2)).eval()
    weights_file = tiny_dinov2 / "model.safetensors"
    assert extractor.provenance()["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    # Random weights see little difference between two sets of real digits, so the images themselves are corrupted.
    real = digit_images[0][:40]
    assert_strictly_increasing(distances_under_corruption(extractor, real, real))


@pytest.mark.slow
def test_inception_distance_grows_with_corruption_and_equals_torchmetrics_fid(
    digit_images, random_inception_weights
):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # Inception costs ~0.2 s per image on a CPU, so the sets are tiny; random weights need the images themselves
    # corrupted (as for DINOv2).
    extractor = InceptionFeatures(random_inception_weights)
    real = digit_images[0][:6]
    distances = distances_under_corruption(extractor, real, real)
    assert_strictly_increasing(distances)

    torchmetrics_fid = FrechetInceptionDistance(
        feature=2048, antialias=False, feature_extractor_weights_path=str(random_inception_weights)
    )
    torchmetrics_fid.update(real.expand(-1, 3, -1, -1), real=True)
    torchmetrics_fid.update(corrupt(real, CORRUPTION_LEVELS[2]).expand(-1, 3, -1, -1), real=False)
    assert distances[2] == pytest.approx(float(torchmetrics_fid.compute()), rel=1e-4)


def test_inception_weights_are_taken_from_flag_then_environment_then_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    from_environment = tmp_path / "environment.pth"
    from_environment.write_bytes(b"environment")
    from_flag = tmp_path / "flag.pth"
    from_flag.write_bytes(b"flag")

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    assert resolve_inception_weights(None) == cached
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(from_environment))
    assert resolve_inception_weights(None) == from_environment
    assert resolve_inception_weights(from_flag) == from_flag
    with pytest.raises(MissingWeightsError, match="--inception_weights: .*does not exist"):
        resolve_inception_weights(tmp_path / "typo.pth")


def test_missing_inception_weights_offline_give_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)

    def offline(url, destination, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, out, err = run_cli(capsys, "fid", "--real", "digits", "--fake", "digits", "--feature", "inception")
    assert code != 0 and out == ""
    message = the_error(err)
    assert INCEPTION_WEIGHTS_FILE in message and INCEPTION_WEIGHTS_URL in message
    assert "--inception_weights" in message and "DIA_DIFFUSION_INCEPTION_WEIGHTS" in message


def test_an_unreachable_dinov2_model_gives_one_clear_error(capsys):
    argv = ["fid", "--real", "digits", "--fake", "digits", "--feature", "dinov2"]
    code, out, err = run_cli(capsys, *argv, "--dinov2_model", "/nowhere/dinov2")
    assert code != 0 and out == ""
    assert "--dinov2_model" in the_error(err) and "/nowhere/dinov2" in the_error(err)


@pytest.mark.slow
def test_inception_fid_command_records_its_weights_and_reports_kid_and_is(
    random_inception_weights, pipeline_folder, capsys
):
    result = fid_json(
        capsys, "--real", "digits", "--fake", str(pipeline_folder), "--num_inference_steps", "2",
        "--feature", "inception", "--inception_weights", str(random_inception_weights), "--num_samples", "10",
    )  # fmt: skip
    assert result["metric"] == "fid" and result["metric_name"] == "FID"
    extractor = result["feature_extractor"]
    assert extractor["weights_sha256"] == hashlib.sha256(random_inception_weights.read_bytes()).hexdigest()
    assert extractor["antialias"] is False and result["antialias"] is False
    assert result["real"]["num_samples"] == 10 and result["fake"]["num_samples"] == 10
    assert result["fid"] > 0 and math.isfinite(result["kid"]) and result["kid_std"] >= 0
    assert result["inception_score"] >= 1.0  # exp of a mean KL divergence


def test_the_same_classifier_weights_saved_under_any_name_have_the_same_sha256(tmp_path):
    # The classifier cache writes to a temporary name with the process id before renaming: the bytes, and so the
    # sha256 every measurement records, must not depend on it.
    payload = {"state_dict": torch.nn.Linear(3, 2).state_dict(), "accuracy": 0.5}
    save_reproducibly(payload, tmp_path / ".a.pt.123.partial")
    save_reproducibly(payload, tmp_path / ".a.pt.456.partial")
    assert file_sha256(tmp_path / ".a.pt.123.partial") == file_sha256(tmp_path / ".a.pt.456.partial")
