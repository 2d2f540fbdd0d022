"""Distances in every feature space, the `fid` / `ref` commands, and the evaluator the training script calls.

Inception and DINOv2 run here with random weights of the right layout: that tests the plumbing only, and such a
number is never a result.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

from dia_diffusion.commands.cli import main as cli_main
from dia_diffusion.data.image_datasets import load_image_dataset, to_uint8_images
from dia_diffusion.evaluation import frechet
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
from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.pipelines.sampling import load_pipeline, sample_to_folder

CORRUPTION_LEVELS = (0.0, 0.1, 0.25, 0.5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A classifier cache with the digits 8x8 classifier already trained, shared by this module's tests."""
    folder = tmp_path_factory.mktemp("cache")
    build_feature_extractor("classifier", 8, 1, classifier_dataset="digits", cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    """A saved DDPMPipeline with a tiny untrained 8x8 grey UNet."""
    folder = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_GREY_UNET)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


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
def tiny_dinov2(tmp_path_factory) -> Path:
    """A folder holding a tiny randomly initialised DINOv2, saved as transformers saves the real ones."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        image_size=224,
    )
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return folder


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


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def the_error(err: str) -> str:
    """The one line an error reaches the user as (progress bars may share stderr; a traceback may not)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("dia-diffusion ")]
    assert len(errors) == 1, err
    return errors[0]


def fid_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "fid", "--json", *argv)
    assert code == 0, err
    return json.loads(out)


# --- every feature space: FD grows as the fake images are progressively corrupted ---------------------------


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


# --- Inception weights: where they come from, and the one error when they are missing ------------------------


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


# --- the commands ----------------------------------------------------------------------------------------------


def test_ref_then_fid_against_the_npz_equals_fid_against_the_images(
    pipeline_folder, cache_dir, tmp_path, capsys
):
    common = ["--feature", "classifier", "--cache_dir", str(cache_dir), "--num_samples", "300"]
    sampling = ["--scheduler", "ddim", "--num_inference_steps", "2", "--seed", "3"]
    reference = str(tmp_path / "digits-train.npz")
    code, out, err = run_cli(capsys, "ref", "digits", "--out", reference, *common)
    assert code == 0, err
    assert "300 images" in out

    from_images = fid_json(capsys, "--real", "digits", "--fake", str(pipeline_folder), *common, *sampling)
    from_npz = fid_json(capsys, "--real", reference, "--fake", str(pipeline_folder), *common, *sampling)
    assert from_npz["fd_classifier"] == pytest.approx(from_images["fd_classifier"], rel=1e-12)
    assert from_images["fd_classifier"] > 0

    # The record says how the number was computed.
    assert (
        from_images["metric"] == "fd_classifier" and from_images["metric_name"] == "FD (classifier features)"
    )
    extractor = from_images["feature_extractor"]
    assert (
        extractor["kind"] == "classifier" and extractor["dataset"] == "digits" and extractor["accuracy"] > 0.9
    )
    assert extractor["weights_sha256"] == hashlib.sha256(Path(extractor["weights"]).read_bytes()).hexdigest()
    assert from_images["resolution"] == 8 and from_images["channels"] == 1 and "antialias" in from_images
    assert from_images["real"] == {"spec": "digits", "kind": "dataset", "num_samples": 300, "split": "train"}
    assert from_images["fake"]["num_samples"] == 300
    assert from_images["fake"]["scheduler"] == "ddim" and from_images["fake"]["num_inference_steps"] == 2
    assert from_images["fake"]["seed"] == 3 and from_images["fake"]["eta"] == 0.0
    assert from_npz["real"]["computed_from"]["split"] == "train"


def test_a_samples_folder_measures_the_same_as_the_pipeline_it_came_from(
    pipeline_folder, cache_dir, tmp_path, capsys
):
    common = [
        "--real",
        "digits",
        "--feature",
        "classifier",
        "--cache_dir",
        str(cache_dir),
        "--num_samples",
        "12",
    ]
    sample_to_folder(
        pipeline_folder, tmp_path / "samples", "ddpm", num_inference_steps=2, num_images=12, seed=5
    )
    from_folder = fid_json(capsys, "--fake", str(tmp_path / "samples"), *common)
    from_pipeline = fid_json(
        capsys, "--fake", str(pipeline_folder), "--scheduler", "ddpm", "--num_inference_steps", "2", "--seed", "5",
        *common,
    )  # fmt: skip
    assert from_folder["fd_classifier"] == pytest.approx(from_pipeline["fd_classifier"], rel=1e-12)
    assert from_folder["fake"]["scheduler"] == "ddpm" and from_folder["fake"]["kind"] == "samples"


def test_fid_counts_only_the_recorded_samples_and_refuses_a_folder_without_its_record(
    pipeline_folder, cache_dir, tmp_path, capsys
):
    samples = tmp_path / "samples"
    sample_to_folder(pipeline_folder, samples, "ddpm", num_inference_steps=2, num_images=6, seed=5)
    common = ["--real", "digits", "--feature", "classifier", "--cache_dir", str(cache_dir)]
    assert (
        fid_json(capsys, "--fake", str(samples), "--num_samples", "100", *common)["fake"]["num_samples"] == 6
    )

    # Without samples.json the folder would read as an image folder: the grid would count as a seventh sample.
    (samples / "samples.json").unlink()
    code, out, err = run_cli(capsys, "fid", "--fake", str(samples), *common)
    assert code == 2 and out == "" and "no samples.json" in the_error(err)


def test_a_damaged_sample_image_is_named(pipeline_folder, cache_dir, tmp_path, capsys):
    samples = tmp_path / "samples"
    sample_to_folder(pipeline_folder, samples, "ddpm", num_inference_steps=2, num_images=4)
    damaged = samples / "000002.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    argv = ["fid", "--real", "digits", "--fake", str(samples), "--feature", "classifier"]
    code, out, err = run_cli(capsys, *argv, "--cache_dir", str(cache_dir))
    assert code == 2 and out == "" and f"'{damaged}' is corrupt" in the_error(err)


def write_numpy_array(path: Path) -> None:
    with open(path, "wb") as file:
        np.save(file, np.zeros(3))


def write_cut_statistics(path: Path) -> None:
    FeatureStatistics.of(np.eye(3)).save(path, {})
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_text("not numbers"), "is not a feature statistics file"),
        (write_numpy_array, "is not a feature statistics file"),
        (lambda path: np.savez(path, mean=np.zeros(3)), "is not a feature statistics file"),
        (write_cut_statistics, "cannot read feature statistics"),
    ],
    ids=["text", "npy", "other npz", "cut short"],
)
def test_a_bad_statistics_file_is_named_in_one_line(tmp_path, capsys, write, message):
    statistics = tmp_path / "reference.npz"
    write(statistics)
    code, out, err = run_cli(
        capsys, "fid", "--real", str(statistics), "--fake", "digits", "--feature", "classifier"
    )
    assert code == 2 and out == ""
    assert message in the_error(err) and str(statistics) in the_error(err)


def test_ref_refuses_an_output_it_cannot_write_before_measuring(tmp_path, capsys):
    (tmp_path / "taken.npz").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, message in (
        (tmp_path / "taken.npz", "is a folder"),
        (tmp_path / "a-file" / "ref.npz", "lies under"),
    ):
        code, _, err = run_cli(capsys, "ref", "digits", "--out", str(out), "--feature", "classifier")
        assert code == 2 and message in the_error(err)
        assert "real images" not in err  # refused before a single image was measured


def test_ctrl_c_while_ref_writes_leaves_the_previous_statistics(cache_dir, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference.npz"
    argv = [
        "ref",
        "digits",
        "--out",
        str(reference),
        "--feature",
        "classifier",
        "--cache_dir",
        str(cache_dir),
    ]
    assert run_cli(capsys, *argv, "--num_samples", "20")[0] == 0
    before = reference.read_bytes()

    def interrupted_savez(path, **arrays):
        Path(path).write_bytes(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(frechet.np, "savez", interrupted_savez)
    code, out, err = run_cli(capsys, *argv, "--num_samples", "30")
    assert code == 130, err[-500:]
    assert err.endswith("dia-diffusion ref: interrupted\n") and "Traceback" not in err
    assert reference.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == [
        "reference.npz"
    ]


DIGITS_AGAINST_DIGITS = ("fid", "--real", "digits", "--fake", "digits", "--feature", "classifier")


def test_a_damaged_cached_classifier_is_named_with_the_way_out(cache_dir, tmp_path, capsys):
    cached = next((cache_dir / "classifiers").glob("digits-8-1.pt"))
    damaged = tmp_path / "classifiers" / cached.name
    damaged.parent.mkdir()
    damaged.write_bytes(cached.read_bytes()[:1000])
    code, out, err = run_cli(capsys, *DIGITS_AGAINST_DIGITS, "--cache_dir", str(tmp_path))
    assert code == 2 and out == "" and str(damaged) in the_error(err) and "delete it" in the_error(err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch_size", "0"], "--batch_size must be positive"),
        (["--resolution", "0"], "--resolution must be positive"),
        (["--fake", "one image"], "holds 1 image; a covariance needs at least 2"),
    ],
    ids=["batch size", "resolution", "one image"],
)
def test_values_no_distance_can_come_from_are_named(cache_dir, tmp_path, capsys, flags, message):
    digits_folder(tmp_path / "one image", "test", 1)
    flags = [str(tmp_path / flag) if flag == "one image" else flag for flag in flags]
    code, out, err = run_cli(capsys, *DIGITS_AGAINST_DIGITS, "--cache_dir", str(cache_dir), *flags)
    assert code == 2 and out == "" and message in the_error(err)


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_request:
        cli_main(["fid", "--real", "digits"])
    assert exit_request.value.code == 2
    assert (
        capsys.readouterr().err == "dia-diffusion fid: error: the following arguments are required: --fake\n"
    )


def test_text_output_names_the_metric_and_the_classifier_accuracy(cache_dir, capsys):
    argv = ["fid", "--real", "digits", "--fake", "digits", "--split", "test", "--feature", "classifier"]
    code, out, err = run_cli(capsys, *argv, "--cache_dir", str(cache_dir), "--num_samples", "100")
    assert code == 0, err
    assert out.startswith("FD (classifier features): ") and "held-out accuracy" in out and "FID" not in out
    distance_of_the_test_split_to_itself = float(out.split()[3])
    assert abs(distance_of_the_test_split_to_itself) < 1e-6


def test_a_reference_of_another_geometry_is_refused(tiny_dinov2, tmp_path, capsys):
    reference = str(tmp_path / "digits-16.npz")
    common = ["--feature", "dinov2", "--dinov2_model", str(tiny_dinov2), "--num_samples", "20"]
    code, _, err = run_cli(capsys, "ref", "digits", "--out", reference, "--resolution", "16", *common)
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "fid", "--real", reference, "--fake", "digits", "--resolution", "8", *common
    )
    assert code != 0 and out == ""
    assert "16px" in the_error(err) and "8px" in the_error(err)


def digits_folder(folder: Path, split: str, count: int, size: int = 8, mode: str = "L") -> Path:
    """`count` digits of `split` as PNGs of size x size pixels in `mode`, in one folder (no labels)."""
    folder.mkdir(parents=True)
    for index, image in enumerate(load_image_dataset("digits", split=split)[:count]["image"]):
        image.resize((size, size)).convert(mode).save(folder / f"{index}.png")
    return folder


def test_classifier_features_use_the_labelled_side_and_swapping_the_sides_changes_nothing(
    cache_dir, tmp_path, capsys
):
    unlabelled = str(digits_folder(tmp_path / "unlabelled", "test", 40))
    common = ["--feature", "classifier", "--cache_dir", str(cache_dir), "--num_samples", "40"]
    forward = fid_json(capsys, "--real", "digits", "--fake", unlabelled, *common)
    swapped = fid_json(capsys, "--real", unlabelled, "--fake", "digits", *common)
    for result in (forward, swapped):
        assert result["feature_extractor"]["dataset"] == "digits"
        assert (result["resolution"], result["channels"]) == (8, 1)
    assert swapped["fd_classifier"] == pytest.approx(forward["fd_classifier"], rel=1e-9)
    assert forward["fd_classifier"] > 0


def test_the_image_geometry_comes_from_the_real_side(tiny_dinov2, tmp_path, capsys):
    grey_8 = str(digits_folder(tmp_path / "grey-8", "train", 6))
    rgb_12 = str(digits_folder(tmp_path / "rgb-12", "test", 6, size=12, mode="RGB"))
    common = ["--feature", "dinov2", "--dinov2_model", str(tiny_dinov2), "--num_samples", "6"]
    forward = fid_json(capsys, "--real", grey_8, "--fake", rgb_12, *common)
    swapped = fid_json(capsys, "--real", rgb_12, "--fake", grey_8, *common)
    assert (forward["resolution"], forward["channels"]) == (8, 1)
    assert (swapped["resolution"], swapped["channels"]) == (12, 3)
    pinned = fid_json(
        capsys, "--real", rgb_12, "--fake", grey_8, "--resolution", "8", "--channels", "1", *common
    )
    assert pinned["fd_dinov2"] == pytest.approx(forward["fd_dinov2"], rel=1e-6)


def test_classifier_features_without_a_labelled_dataset_are_refused(pipeline_folder, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "fid", "--real", str(pipeline_folder), "--fake", str(pipeline_folder), "--feature", "classifier",
        "--cache_dir", str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "--classifier_dataset" in the_error(err)


# --- the evaluator the training script calls --------------------------------------------------------------------


def test_evaluator_matches_the_fid_command_and_leaves_the_model_as_it_was(
    pipeline_folder, cache_dir, tmp_path, capsys
):
    evaluator = PipelineEvaluator(
        "digits", num_samples=16, num_inference_steps=2, seed=1, cache_dir=str(cache_dir)
    )
    pipeline = load_pipeline(pipeline_folder, "ddpm")
    pipeline.unet.train()
    result = evaluator(pipeline)
    assert list(result) == ["fd_classifier"] and result["fd_classifier"] > 0
    assert pipeline.unet.training
    assert evaluator(pipeline) == result
    assert evaluator.provenance["feature_extractor"]["accuracy"] > 0.9

    # The same number from the command line: all 1500 training digits against the same 16 DDIM samples.
    reference = str(tmp_path / "digits.npz")
    common = ["--feature", "classifier", "--cache_dir", str(cache_dir)]
    assert run_cli(capsys, "ref", "digits", "--out", reference, "--num_samples", "1500", *common)[0] == 0
    sampling = ["--num_samples", "16", "--scheduler", "ddim", "--num_inference_steps", "2", "--seed", "1"]
    from_command = fid_json(capsys, "--real", reference, "--fake", str(pipeline_folder), *common, *sampling)
    assert result["fd_classifier"] == pytest.approx(from_command["fd_classifier"], rel=1e-9)


EVALUATE_ON_EVERY_PROCESS = """
import json, sys
from accelerate import Accelerator
from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.pipelines.sampling import load_pipeline

accelerator = Accelerator(cpu=True)
evaluator = PipelineEvaluator("digits", num_samples=9, num_inference_steps=2, cache_dir=sys.argv[2],
                              accelerator=accelerator)
result = evaluator(load_pipeline(sys.argv[1], "ddpm"))
with open(f"{sys.argv[3]}/rank-{accelerator.process_index}-of-{accelerator.num_processes}.json", "w") as file:
    json.dump(result, file)
"""


@pytest.mark.slow
def test_two_processes_split_generation_and_both_get_the_single_process_result(
    pipeline_folder, cache_dir, tmp_path
):
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE_ON_EVERY_PROCESS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [*command, str(script), str(pipeline_folder), str(cache_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = [
        json.loads((tmp_path / f"rank-{rank}-of-2.json").read_text())["fd_classifier"] for rank in (0, 1)
    ]
    assert results[0] == results[1]

    single = PipelineEvaluator("digits", num_samples=9, num_inference_steps=2, cache_dir=str(cache_dir))
    assert results[0] == pytest.approx(
        single(load_pipeline(pipeline_folder, "ddpm"))["fd_classifier"], rel=1e-9
    )
