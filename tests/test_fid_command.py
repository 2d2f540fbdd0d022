"""The `fid` and `ref` commands: `ref` then `fid` against the .npz equals `fid` against the images, a samples
folder measures as its pipeline, what the record says, the image geometry and the labelled side, and the values no
distance can come from. Their faults are tested in test_fid_faults.py, the feature spaces in
test_feature_spaces.py."""

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDIMScheduler
from fid_cli import DIGITS_AGAINST_DIGITS, fid_json, run_cli, the_error

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.cli import main as cli_main
from dia_diffusion.data.image_datasets import load_image_dataset
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline
from dia_diffusion.pipelines.sampling import sample_to_folder


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


@pytest.fixture(scope="module")
def digit_classes_pipeline(tmp_path_factory) -> Path:
    """A saved tiny untrained class-conditional pipeline with the ten digit classes and the null class."""
    torch.manual_seed(0)
    unet = DIAUNet2DModel(**TINY_GREY_UNET, num_class_embeds=11)
    folder = tmp_path_factory.mktemp("class-conditional")
    ClassConditionalPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=20)).save_pretrained(
        folder
    )
    return folder


def test_a_class_conditional_model_reports_class_accuracy_only_in_classifier_features(
    digit_classes_pipeline, cache_dir, tiny_dinov2, capsys
):
    common = ["--real", "digits", "--fake", str(digit_classes_pipeline), "--num_samples", "20"]
    common += ["--num_inference_steps", "2", "--guidance_scale", "1.5"]
    measured = fid_json(capsys, *common, "--feature", "classifier", "--cache_dir", str(cache_dir))
    assert measured["fake"]["guidance_scale"] == 1.5
    # Two samples of each of the ten classes: the mean over classes of each class's hit rate is a multiple of 1/20.
    accuracy = measured["fake"]["class_accuracy"]
    assert 0 <= accuracy <= 1 and round(20 * accuracy, 6) == round(20 * accuracy)
    in_dinov2 = ["--feature", "dinov2", "--dinov2_model", str(tiny_dinov2)]
    assert fid_json(capsys, *common, *in_dinov2)["fake"]["class_accuracy"] is None
    code, out, err = run_cli(capsys, "fid", *common, *in_dinov2)
    assert code == 0, err
    assert "class accuracy (fake): not measured; it needs --feature classifier" in out
