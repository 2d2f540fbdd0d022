"""train/train_text_to_image.py: a tiny Stable Diffusion (offline components) fine-tuned on captioned images the test
writes, through the one training loop. The retrofit starts from what the stock model computes, a run resumes
bitwise (also after SIGTERM), cached latents train as the images do, the saved pipeline loads in a fresh process and
samples, and bad input is one line before anything is written. The items themselves: test_captioned_images.py."""

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script
from huggingface_hub import ModelCard
from tiny_stable_diffusion import stable_diffusion, stable_diffusion_xl
from tiny_training import assert_same_weights, read_metrics, reset_accelerate_state

from dia_diffusion import apply_dia
from dia_diffusion.data.image_datasets import load_image_dataset
from dia_diffusion.runtime.file_digests import folder_weights_sha256
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.config import TrainingConfigError, resolve_config, run_record
from dia_diffusion.training.loop import train
from dia_diffusion.training.pretrained_pipeline import PretrainedPipelineError, load_pretrained_pipeline
from dia_diffusion.training.text_to_image_task import TextToImageTask

CAPTIONS = ["lower newer", "wider lowest", "lowest", "newer"]

pytestmark = pytest.mark.usefixtures("isolated_run", "private_datasets_cache")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd")
    stable_diffusion(folder / "tokenizer-source").save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory) -> Path:
    """Eight 40x48 RGB images, larger than the 32-pixel training size, so crops differ."""
    folder = tmp_path_factory.mktemp("captioned")
    draws = np.random.default_rng(0)
    rows = []
    for index in range(8):
        PIL.Image.fromarray(draws.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": CAPTIONS[index % len(CAPTIONS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def fine_tune_config(sd_folder: Path, dataset: Path, output_dir: Path, **overrides):
    settings = {
        "pretrained_model": str(sd_folder),
        "dataset": str(dataset),
        "output_dir": str(output_dir),
        "resolution": 32,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "log_every": 1,
        "report_to": "none",
        "num_sample_images": 2,
        "sample_inference_steps": 2,
        **overrides,
    }
    return resolve_config("sd-finetune", settings)


def test_a_fine_tune_leaves_a_pipeline_that_loads_in_a_fresh_process_and_samples(
    sd_folder, captioned_folder, tmp_path
):
    run = tmp_path / "run"
    config = fine_tune_config(
        sd_folder, captioned_folder, run, validation_prompts=["lower", "wider newer", "newer"]
    )
    result = train(config)
    assert result.global_step == 4 and type(result.unet).__name__ == "DIAUNet2DConditionModel"
    record = json.loads((run / "training_config.json").read_text())
    assert record["pretrained_model"] == str(sd_folder) and len(record["pretrained_model_sha256"]) == 64
    assert record["beta_schedule"] == "scaled_linear" and record["dia_gate"] == "identity"
    # The VAE and the text encoder were used frozen: the saved pipeline holds the source's weights.
    for frozen in ("vae", "text_encoder"):
        assert folder_weights_sha256(run / frozen) == folder_weights_sha256(sd_folder / frozen)
    card = ModelCard.load(run / "README.md")
    assert (
        card.data.pipeline_tag == "text-to-image" and "StableDiffusionPipeline.from_pretrained" in card.text
    )
    # Three prompts, two images each: one row per prompt (32-pixel images upscaled to 64, 2-pixel padding).
    assert PIL.Image.open(run / "samples" / "step-0000004.png").size == (2 * 66 + 2, 3 * 66 + 2)
    check = (
        "import sys, dia_diffusion, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipeline = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "pipeline.set_progress_bar_config(disable=True)\n"
        "images = pipeline('lower newer', num_inference_steps=2, output_type='np', "
        "generator=torch.Generator().manual_seed(0)).images\n"
        "print(type(pipeline.unet).__name__, images.shape, bool(abs(images).sum() > 0))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", check, str(run)], capture_output=True, text=True, check=True
    ).stdout
    # At the pipeline's own size (the UNet's sample_size 32 x the VAE's factor 2).
    assert output.split("\n")[-2] == "DIAUNet2DConditionModel (1, 64, 64, 3) True"


def first_loss(config) -> float:
    train(config)
    reset_accelerate_state()
    return read_metrics(Path(config.output_dir))[0]["loss"]


def test_the_retrofit_starts_from_what_the_stock_model_computes(sd_folder, captioned_folder, tmp_path):
    settings = dict(max_train_steps=1, checkpointing_steps=1, num_sample_images=1)
    dia = first_loss(fine_tune_config(sd_folder, captioned_folder, tmp_path / "dia", **settings))
    stock = first_loss(
        fine_tune_config(sd_folder, captioned_folder, tmp_path / "stock", unet="stock", **settings)
    )
    # A gate that is not the identity changes what the model computes from the first step on.
    sigmoid = first_loss(
        fine_tune_config(sd_folder, captioned_folder, tmp_path / "sigmoid", dia_gate="sigmoid", **settings)
    )
    assert dia == stock and sigmoid != stock


def test_a_fine_tune_with_random_crops_flips_and_dropped_captions_resumes_bitwise(
    sd_folder, captioned_folder, tmp_path
):
    settings = dict(random_flip=True, caption_dropout=0.5, max_train_steps=6, checkpointing_steps=3)
    whole = train(fine_tune_config(sd_folder, captioned_folder, tmp_path / "whole", **settings))
    reset_accelerate_state()
    train(
        fine_tune_config(
            sd_folder, captioned_folder, tmp_path / "split", **{**settings, "max_train_steps": 3}
        )
    )
    reset_accelerate_state()
    resumed = train(
        fine_tune_config(
            sd_folder, captioned_folder, tmp_path / "split", resume_from_checkpoint="latest", **settings
        )
    )
    assert resumed.global_step == 6
    assert_same_weights(whole, resumed)


def script_flags(sd_folder: Path, dataset: Path, output_dir: Path, *flags: str) -> list[str]:
    return ["--pretrained_model", str(sd_folder), "--dataset", str(dataset), "--output_dir", str(output_dir),
            "--resolution", "32", "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none",
            "--num_sample_images", "1", "--sample_inference_steps", "2", *flags]  # fmt: skip


def test_sigterm_keeps_the_last_checkpoint_and_the_run_resumes_to_the_uninterrupted_weights(
    sd_folder, captioned_folder, tmp_path, capsys, monkeypatch
):
    script = load_script("train/train_text_to_image.py")
    whole = train(fine_tune_config(sd_folder, captioned_folder, tmp_path / "whole", caption_dropout=0.5))
    reset_accelerate_state()
    real_loss = training_steps.diffusion_loss
    calls = {"count": 0}

    def sigterm_during_step_3(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            signal.raise_signal(signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training_steps, "diffusion_loss", sigterm_during_step_3)
    run = tmp_path / "run"
    code = script.main(script_flags(sd_folder, captioned_folder, run, "--caption_dropout", "0.5"))
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("train_text_to_image.py")
    ]
    checkpoint = run / "checkpoints" / "checkpoint-2"
    assert code == 128 + signal.SIGTERM
    assert lines == [
        f"train_text_to_image.py: interrupted: stopped by SIGTERM; '{checkpoint}' is the last checkpoint "
        "(--resume_from_checkpoint latest)"
    ]
    monkeypatch.setattr(training_steps, "diffusion_loss", real_loss)
    reset_accelerate_state()
    resumed = train(
        fine_tune_config(
            sd_folder,
            captioned_folder,
            run,
            caption_dropout=0.5,
            num_sample_images=1,
            resume_from_checkpoint="latest",
        )
    )
    assert_same_weights(whole, resumed)


def test_cached_latents_train_as_the_images_do(sd_folder, captioned_folder, tmp_path):
    settings = dict(center_crop=True, max_train_steps=2, checkpointing_steps=2, num_sample_images=1)
    images = train(
        fine_tune_config(sd_folder, captioned_folder, tmp_path / "images", caption_dropout=0.5, **settings)
    )
    reset_accelerate_state()
    cached = train(
        fine_tune_config(
            sd_folder,
            captioned_folder,
            tmp_path / "cached",
            caption_dropout=0.5,
            cache_latents=True,
            **settings,
        )
    )
    # The same latent samples, dropped captions, noise and timesteps: the same losses, up to the text encoder's
    # batch-size rounding (~1e-8); the weights after Adam's first steps amplify that, so the losses are compared.
    cached_losses = [row["loss"] for row in read_metrics(tmp_path / "cached")]
    assert cached_losses == pytest.approx(
        [row["loss"] for row in read_metrics(tmp_path / "images")], rel=1e-5
    )
    assert images.global_step == cached.global_step == 2


@pytest.mark.parametrize(
    "case",
    [
        "missing caption column",
        "sdxl",
        "cache with random crops",
        "resolution",
        "no pretrained model",
        "offline",
        "ddpm preset",
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(
    case, sd_folder, captioned_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = load_script("train/train_text_to_image.py")
    run = tmp_path / "run"
    flags = script_flags(sd_folder, captioned_folder, run)
    expected = {
        "missing caption column": f"dataset '{captioned_folder}' has no caption column 'caption' (columns: image, text)",
        "sdxl": "holds a StableDiffusionXLPipeline; this trainer fine-tunes a StableDiffusionPipeline",
        "cache with random crops": "--cache_latents encodes every image once, so it cannot take random crops",
        "resolution": "--resolution 30 cannot be divided by 4",
        "no pretrained model": "--pretrained_model is required",
        "offline": "--pretrained_model 'someone/no-such-model' is not a local folder, and the Hugging Face hub",
        "ddpm preset": "--pretrained_model needs a text-to-image preset (sd-finetune)",
    }[case]
    if case == "missing caption column":
        flags += ["--caption_column", "caption"]
    elif case == "sdxl":
        xl = tmp_path / "xl"
        stable_diffusion_xl(tmp_path / "tokenizers").save_pretrained(xl)
        flags[1] = str(xl)
    elif case == "cache with random crops":
        flags += ["--cache_latents"]
    elif case == "resolution":
        flags += ["--resolution", "30"]
    elif case == "no pretrained model":
        flags = flags[2:]
    elif case == "ddpm preset":
        flags += ["--preset", "demo"]
    else:
        flags[1] = "someone/no-such-model"
    capsys.readouterr()
    try:
        code = script.main(flags)
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("train_text_to_image.py")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], stderr
    assert not run.exists()


def test_the_pipeline_decides_the_schedule_and_a_dia_unet_its_attention(
    sd_folder, captioned_folder, tmp_path
):
    """A stock UNet is retrofitted with the identity gate unless --dia_gate is given; a DIA UNet, from an earlier
    fine-tune, continues with its own attention; an explicit setting that contradicts the pipeline is refused by
    name."""

    def settings(folder: Path, **overrides):
        return fine_tune_config(folder, captioned_folder, tmp_path / "unused", **overrides)

    scheduler = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
    retrofit = settings(sd_folder)
    assert (retrofit.unet, retrofit.dia_gate) == ("dia", "identity")
    assert retrofit.num_train_timesteps == scheduler["num_train_timesteps"]
    assert retrofit.beta_schedule == scheduler["beta_schedule"]
    assert settings(sd_folder, dia_gate="sigmoid").dia_gate == "sigmoid"
    assert settings(sd_folder, unet="stock").unet == "stock"
    with pytest.raises(
        PretrainedPipelineError, match=r"--num_train_timesteps 7 contradicts --pretrained_model '"
    ):
        settings(sd_folder, num_train_timesteps=7)

    dia_folder = tmp_path / "dia"
    pipeline = load_pretrained_pipeline(str(sd_folder))
    apply_dia(pipeline, dia_attention="se_shared", dia_sharing="per_block", dia_gate="sigmoid")
    pipeline.save_pretrained(dia_folder)
    continued = settings(dia_folder)
    assert (continued.unet, continued.dia_sharing, continued.dia_gate) == (
        "se-shared",
        "per_block",
        "sigmoid",
    )
    with pytest.raises(
        PretrainedPipelineError, match=r"--unet stock cannot start from .*pass --unet se-shared"
    ):
        settings(dia_folder, unet="stock")
    with pytest.raises(PretrainedPipelineError, match=r"--dia_sharing 'global' contradicts .*'per_block'"):
        settings(dia_folder, dia_sharing="global")
    config_file = dia_folder / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dia_attention": "mystery"}))
    with pytest.raises(
        PretrainedPipelineError, match=r"dia_attention 'mystery', which no --unet variant trains"
    ):
        settings(dia_folder)


def test_a_run_records_the_settings_it_uses_and_no_others():
    """Records written before these settings existed must still resume: a DDPM run records none of the text-to-image
    settings, and the loss settings only where they differ from DDPM's loss."""
    ddpm = run_record(resolve_config("demo", {"output_dir": "run"}), num_processes=1)
    assert not {"pretrained_model", "caption_dropout", "cache_latents", "snr_gamma", "noise_offset"} & set(
        ddpm
    )
    weighted = run_record(resolve_config("demo", {"output_dir": "run", "snr_gamma": 5.0}), num_processes=1)
    assert weighted["snr_gamma"] == 5.0 and "noise_offset" not in weighted


def placed_task(sd_folder: Path, dataset: Path, tmp_path: Path, **overrides) -> TextToImageTask:
    config = fine_tune_config(sd_folder, dataset, tmp_path / "unused", **overrides)
    task = TextToImageTask(
        config,
        load_pretrained_pipeline(str(sd_folder)),
        load_image_dataset(str(dataset), caption_column="text"),
    )
    task.place(SimpleNamespace(device=torch.device("cpu"), is_main_process=False))
    return task


def test_the_clean_samples_are_a_sample_of_the_vaes_latents_scaled_as_stable_diffusion_trains(
    sd_folder, captioned_folder, tmp_path
):
    task = placed_task(sd_folder, captioned_folder, tmp_path)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(1)
    latents = task.clean_samples({"pixel_values": pixels})
    # By hand: the encoder's mean and log-variance, one draw of N(0, 1), the VAE's scaling factor (0.18215 in SD).
    moments = task.vae.quant_conv(task.vae.encoder(pixels)).detach()
    mean, log_variance = moments.chunk(2, dim=1)
    torch.manual_seed(1)
    draw = torch.randn(mean.shape)
    expected = (mean + (0.5 * log_variance.clamp(-30, 20)).exp() * draw) * task.vae.config.scaling_factor
    assert task.vae.config.scaling_factor != 1
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    assert latents.is_contiguous() and not latents.requires_grad
    # Cached, the same distribution gives the same sample.
    torch.manual_seed(1)
    cached = task.clean_samples({"latent_parameters": moments})
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_a_dropped_caption_is_encoded_as_the_empty_one(sd_folder, captioned_folder, tmp_path, cached):
    task = placed_task(sd_folder, captioned_folder, tmp_path, caption_dropout=0.5)
    input_ids = torch.stack(
        [task.tokenize(caption) for caption in ["lower newer", "wider", "lowest", "newer"] * 4]
    )
    states = task.text_encoder(input_ids)[0].detach()
    batch = {"encoder_hidden_states": states} if cached else {"input_ids": input_ids}
    torch.manual_seed(0)
    given = task.unet_inputs(batch)["encoder_hidden_states"]
    torch.manual_seed(0)
    dropped = torch.rand(len(input_ids)) < 0.5
    empty = task.text_encoder(task.tokenize("")[None])[0].detach()
    expected = torch.where(dropped[:, None, None], empty, states)
    assert 0 < dropped.sum() < len(dropped)
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-6)


def test_cached_latents_need_one_caption_per_image(sd_folder, captioned_folder, tmp_path):
    task = placed_task(sd_folder, captioned_folder, tmp_path, center_crop=True, cache_latents=True)
    loaded = load_image_dataset(str(captioned_folder), caption_column="text")
    several = datasets.Dataset.from_dict(
        {"image": loaded["image"], "text": [[text, "wider"] for text in loaded["text"]]},
        features=datasets.Features({"image": datasets.Image(), "text": [datasets.Value("string")]}),
    )
    with pytest.raises(
        TrainingConfigError, match="^--cache_latents needs one caption per image; this dataset has"
    ):
        task.training_items(several)
    encoded = task.training_items(loaded)
    assert len(encoded) == 8 and encoded[0]["latent_parameters"].shape == (8, 16, 16)
