"""Sampling through the stock diffusers pipelines: per-sample seeds, the files sample.py writes, its errors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.sampling import (
    SamplingError,
    generate,
    load_pipeline,
    sample_to_folder,
    stock_pipeline,
    to_uint8,
)

SAMPLE_SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "sample.py"


def save_tiny_pipeline(folder: Path, unet_class: type = UNet2DModel, **unet_options) -> Path:
    torch.manual_seed(0)
    unet = unet_class(**TINY_GREY_UNET, **unet_options)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


def sample_script():
    spec = importlib.util.spec_from_file_location("sample_script", SAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images_by_index(pipeline, indices, batch_size, eta=None) -> dict[int, torch.Tensor]:
    images = {}
    for batch, batch_images in generate(
        pipeline, indices, seed=7, batch_size=batch_size, num_inference_steps=2, eta=eta
    ):
        images.update(zip(batch, batch_images, strict=True))
    return images


@pytest.mark.parametrize(("scheduler", "eta"), [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0)])
def test_image_i_is_the_same_whatever_the_batch_size(pipeline_folder, scheduler, eta):
    pipeline = load_pipeline(pipeline_folder, scheduler)
    one_by_one = images_by_index(pipeline, range(5), batch_size=1, eta=eta)
    in_threes = images_by_index(pipeline, range(5), batch_size=3, eta=eta)
    shifted = images_by_index(pipeline, [3, 4], batch_size=2, eta=eta)
    for index in range(5):
        assert torch.equal(one_by_one[index], in_threes[index]), f"image {index} depends on the batch size"
    assert torch.equal(shifted[3], one_by_one[3]) and torch.equal(shifted[4], one_by_one[4])
    assert not torch.equal(one_by_one[0], one_by_one[1]), "different indices must get different seeds"
    assert one_by_one[0].dtype == torch.uint8 and one_by_one[0].shape == (1, 8, 8)


def test_load_pipeline_builds_the_stock_pipeline_for_each_scheduler(pipeline_folder):
    assert type(load_pipeline(pipeline_folder, "ddpm")) is DDPMPipeline
    ddim = load_pipeline(pipeline_folder, "ddim")
    assert type(ddim) is DDIMPipeline
    assert ddim.scheduler.config.num_train_timesteps == 100


def test_sampling_runs_in_eval_mode_and_restores_the_training_mode(pipeline_folder):
    pipeline = load_pipeline(pipeline_folder, "ddim")
    pipeline.unet.train()
    modes = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    images_by_index(pipeline, range(2), batch_size=2)
    assert modes and not any(modes)
    assert pipeline.unet.training


def test_sample_script_writes_numbered_pngs_grid_and_record(pipeline_folder, tmp_path, capsys):
    output = tmp_path / "samples"
    argv = ["--model", str(pipeline_folder), "--scheduler", "ddim", "--num_inference_steps", "2"]
    argv += ["--num_images", "5", "--seed", "7", "--batch_size", "2", "--output", str(output)]
    assert sample_script().main(argv) == 0

    names = sorted(path.name for path in output.iterdir())
    assert names == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "000004.png",
        "grid.png",
        "samples.json",
    ]
    expected = images_by_index(load_pipeline(pipeline_folder, "ddim"), range(5), batch_size=5)
    for index in range(5):
        written = np.asarray(PIL.Image.open(output / f"{index:06d}.png"))
        assert np.array_equal(written, expected[index][0].numpy())
    grid = PIL.Image.open(output / "grid.png")
    assert grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 5 images, 3 per row, 2-pixel padding
    record = json.loads((output / "samples.json").read_text())
    assert record["scheduler"] == "ddim" and record["num_inference_steps"] == 2 and record["eta"] == 0.0
    assert record["seed"] == 7 and record["num_images"] == 5 and record["resolution"] == 8
    assert "wrote 5 images" in capsys.readouterr().out


def test_a_dia_unet_pipeline_samples_through_the_stock_pipeline(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "dia", DIAUNet2DModel)
    pipeline = load_pipeline(folder, "ddim")
    assert isinstance(pipeline.unet, DIAUNet2DModel)
    images = images_by_index(pipeline, range(2), batch_size=2)
    assert images[0].shape == (1, 8, 8)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_image_i_of_a_dia_model_is_the_one_image_pipeline_run_seeded_seed_plus_i(tmp_path, scheduler):
    folder = save_tiny_pipeline(tmp_path / "dia", DIAUNet2DModel)
    output = tmp_path / "samples"
    sample_to_folder(folder, output, scheduler, num_inference_steps=2, num_images=3, seed=7, batch_size=3)
    pipeline = load_pipeline(folder, scheduler)
    for index in range(3):
        alone = pipeline(
            batch_size=1,
            generator=torch.Generator().manual_seed(7 + index),
            num_inference_steps=2,
            output_type="pt",
        ).images
        written = np.asarray(PIL.Image.open(output / f"{index:06d}.png"))
        assert np.array_equal(written, to_uint8(alone)[0, 0].numpy()), (
            f"image {index} is not seeded {7 + index}"
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--half"], "--half needs a CUDA GPU"),
        (["--scheduler", "ddpm", "--eta", "0.5"], "--eta applies to the ddim scheduler only"),
        (["--eta", "1.5"], "--eta must lie in [0, 1]"),
        (["--num_images", "0"], "--num_images must be positive"),
    ],
)
def test_sample_script_errors_are_one_line(pipeline_folder, tmp_path, capsys, extra, message):
    if extra == ["--half"] and torch.cuda.is_available():
        pytest.skip("--half is valid where CUDA is present")
    argv = ["--model", str(pipeline_folder), "--num_inference_steps", "2", "--output", str(tmp_path / "out")]
    assert sample_script().main(argv + extra) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(SamplingError, match="no model_index.json"):
        load_pipeline(tmp_path, "ddim")


def test_unknown_scheduler_is_refused(pipeline_folder):
    pipeline = load_pipeline(pipeline_folder, "ddpm")
    with pytest.raises(SamplingError, match="--scheduler"):
        stock_pipeline(pipeline.unet, pipeline.scheduler.config, "euler")
