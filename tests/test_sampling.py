"""Sampling through the stock diffusers pipelines: per-sample seeds, the files sample.py writes, its errors."""

import errno
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script, save_tiny_pipeline
from diffusers import DDIMPipeline, DDPMPipeline

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.pipelines import sampling
from dia_diffusion.pipelines.sampling import (
    SamplingError,
    generate,
    load_pipeline,
    sample_to_folder,
    stock_pipeline,
    to_uint8,
)


def sample_script():
    return load_script("pipelines/sample.py")


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
    # 5 images, 3 per row, each 8x8 image enlarged 8 times (nearest) to 64x64, with 2-pixel padding.
    grid = np.asarray(PIL.Image.open(output / "grid.png"))
    assert grid.shape[:2] == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    fifth = grid[2 + 66 : 2 + 66 + 64, 2 + 66 : 2 + 66 + 64, 0]
    assert np.array_equal(fifth, expected[4][0].numpy().repeat(8, axis=0).repeat(8, axis=1))
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


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def failing_after_first_batch(error: BaseException):
    """A stand-in for `generate` that yields its first batch, then fails as a crash or Ctrl-C would."""

    def generate_then_fail(*args, **kwargs):
        batches = generate(*args, **kwargs)
        yield next(batches)
        raise error

    return generate_then_fail


def test_a_rerun_that_fails_midway_leaves_the_previous_samples_intact(
    pipeline_folder, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "samples"
    argv = [
        "--model",
        str(pipeline_folder),
        "--num_inference_steps",
        "2",
        "--batch_size",
        "2",
        "--output",
        str(output),
    ]
    assert sample_script().main([*argv, "--num_images", "5"]) == 0
    before = folder_contents(output)

    with monkeypatch.context() as patch:
        patch.setattr(sampling, "generate", failing_after_first_batch(RuntimeError("CUDA out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            sampling.sample_to_folder(pipeline_folder, output, num_inference_steps=2, num_images=4, seed=3)
        patch.setattr(sampling, "generate", failing_after_first_batch(KeyboardInterrupt()))
        capsys.readouterr()
        assert sample_script().main([*argv, "--num_images", "4", "--seed", "3"]) == 130
        error = capsys.readouterr().err
        assert error.endswith("\nsample.py: interrupted\n") and "Traceback" not in error
    assert folder_contents(output) == before
    # No staging folder left behind; the lock file beside the output stays (deleting it would race).
    assert sorted(path.name for path in tmp_path.iterdir()) == [".samples.lock", "samples"]

    # A complete re-run replaces the whole folder: no image of the longer first run is left over.
    assert sample_script().main([*argv, "--num_images", "3"]) == 0
    assert sorted(folder_contents(output)) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "grid.png",
        "samples.json",
    ]
    assert json.loads((output / "samples.json").read_text())["num_images"] == 3


def test_an_output_holding_other_files_or_a_file_is_refused_untouched(pipeline_folder, tmp_path, capsys):
    before = folder_contents(pipeline_folder)
    argv = ["--model", str(pipeline_folder), "--num_inference_steps", "2", "--num_images", "2"]
    assert sample_script().main([*argv, "--output", str(pipeline_folder)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model_index.json" in error and "choose another folder" in error
    assert folder_contents(pipeline_folder) == before

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert sample_script().main([*argv, "--output", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    assert sample_script().main([*argv, "--output", str(a_file / "samples")]) == 2
    assert "lies under" in capsys.readouterr().err


def test_a_damaged_model_folder_is_named_in_one_line(tmp_path, capsys):
    model = save_tiny_pipeline(tmp_path / "model")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    argv = ["--model", str(model), "--num_inference_steps", "2", "--output", str(tmp_path / "samples")]
    assert sample_script().main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"sample.py: error: --model '{model}' cannot be loaded") and str(weights) in error
    assert not (tmp_path / "samples").exists()


def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(
    pipeline_folder, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "samples"
    common = ["--model", str(pipeline_folder), "--num_images", "3", "--batch_size", "2"]
    first = [*common, "--seed", "1000", "--num_inference_steps", "2", "--output", str(output)]
    second_run = {}

    def generate_while_a_second_run_starts(*args, **kwargs):
        if not second_run:  # the first run is generating: a second run into the same folder starts now
            second_run["started"] = True
            second = [*common, "--seed", "2000", "--num_inference_steps", "1", "--output", str(output)]
            second_run["code"] = sample_script().main(second)
            second_run["stderr"] = capsys.readouterr().err
        yield from generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate_while_a_second_run_starts)
    assert sample_script().main(first) == 0
    assert second_run["code"] == 2
    assert f"--output '{output.absolute()}' is in use by another sample.py" in second_run["stderr"]

    # The folder is the first run's alone: its record and every image, as a run on its own makes them.
    assert json.loads((output / "samples.json").read_text())["seed"] == 1000
    monkeypatch.setattr(sampling, "generate", generate)
    alone = tmp_path / "alone"
    assert sample_script().main([*first[:-1], str(alone)]) == 0
    assert folder_contents(output) == folder_contents(alone)


def test_a_full_disk_names_the_output_and_leaves_the_previous_samples(
    pipeline_folder, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "samples"
    argv = ["--model", str(pipeline_folder), "--num_inference_steps", "2", "--num_images", "2"]
    assert sample_script().main([*argv, "--output", str(output)]) == 0
    before = folder_contents(output)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sampling, "save_grid", disk_full)
    capsys.readouterr()
    assert sample_script().main([*argv, "--seed", "5", "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (
        f"sample.py: error: '{output}' could not be written: No space left on device (the disk is full: free "
        "space, then run the command again)"
    )
    assert folder_contents(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [".samples.lock", "samples"]


def test_sample_script_loads_a_hub_name_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    # A hub cache laid out as huggingface_hub writes it: refs/main names the snapshot folder holding the files.
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-dia"
    save_tiny_pipeline(repo / "snapshots" / commit, DIAUNet2DModel)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it

    output = tmp_path / "samples"
    argv = [
        "--model",
        "someone/tiny-dia",
        "--num_inference_steps",
        "2",
        "--num_images",
        "2",
        "--output",
        str(output),
    ]
    assert sample_script().main(argv) == 0
    capsys.readouterr()
    assert json.loads((output / "samples.json").read_text())["model"] == "someone/tiny-dia"
    assert (output / "000001.png").is_file()
    assert sample_script().main([*argv[:1], "someone/missing", *argv[2:]]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'someone/missing' is not a local folder" in error
