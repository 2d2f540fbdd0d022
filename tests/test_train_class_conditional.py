"""Class-conditional training through the one training loop (`--class_conditional`): the UNet gets a class embedding
per class plus the null class, the loss sees the labels with some dropped to the null class, the run resumes bitwise,
and it leaves a ClassConditionalPipeline whose grid shows one class per column."""

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from tiny_training import assert_same_weights, read_metrics, reset_accelerate_state, tiny_config

from dia_diffusion.data.image_datasets import DatasetSpecError, load_image_dataset
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.config import TrainingConfigError
from dia_diffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("isolated_run")


def test_a_class_conditional_run_trains_on_the_labels_and_leaves_a_class_conditional_pipeline(
    tiny_dataset, tmp_path, monkeypatch, classifier_cache
):
    monkeypatch.setenv("XDG_CACHE_HOME", classifier_cache)
    seen = []
    real_loss = training_steps.diffusion_loss

    def watched_loss(unet, noise_scheduler, clean_images, **unet_inputs):
        seen.append(unet_inputs["class_labels"].clone())
        return real_loss(unet, noise_scheduler, clean_images, **unet_inputs)

    monkeypatch.setattr(training_steps, "diffusion_loss", watched_loss)
    config = tiny_config(
        tiny_dataset,
        tmp_path / "run",
        class_conditional=True,
        class_dropout=0.5,
        max_train_steps=12,
        checkpointing_steps=12,
        num_sample_images=20,
        guidance_scale=2.0,
        eval_every=12,
        eval_num_samples=20,
        eval_inference_steps=2,
    )
    result = train(config)
    # The evaluation samples every class in turn and reports how often the classifier sees the asked-for class.
    last = read_metrics(tmp_path / "run")[-1]
    assert last["fd_classifier"] > 0 and last["class_accuracy"] in {k / 10 for k in range(11)}
    assert result.unet.config.num_class_embeds == 11  # ten digits and the null class
    labels = torch.cat(seen)
    assert labels.shape == (12 * 4,) and labels.min() >= 0 and labels.max() <= 10
    dropped = (labels == 10).float().mean().item()
    assert 0.25 < dropped < 0.75
    kept = labels[labels != 10]
    assert len(set(kept.tolist())) > 3

    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert "class-conditional-image-generation" in card.data.tags and "DDPMPipeline" not in card.text
    assert "ClassConditionalPipeline.from_pretrained" in card.text and "`class_dropout` | `0.5`" in card.text
    assert "DDIM, 2 steps, EMA weights, every class in turn, guidance scale 2.0" in card.text
    pipeline = ClassConditionalPipeline.from_pretrained(tmp_path / "run")
    assert pipeline.num_classes == 10 and pipeline.get_label_ids("7") == [7]
    images = pipeline([3, 4], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    # 20 images, ten classes: two rows of ten columns (each 8-pixel image upscaled to 64, 2-pixel padding).
    grid = Image.open(tmp_path / "run" / "samples" / "step-0000012.png")
    assert grid.size == (10 * 66 + 2, 2 * 66 + 2)


def test_a_class_conditional_run_resumes_bitwise(tiny_dataset, tmp_path):
    settings = dict(class_conditional=True, class_dropout=0.3, max_train_steps=6, checkpointing_steps=3)
    whole = train(tiny_config(tiny_dataset, tmp_path / "whole", **settings))
    reset_accelerate_state()
    train(tiny_config(tiny_dataset, tmp_path / "split", **{**settings, "max_train_steps": 3}))
    reset_accelerate_state()
    resumed = train(
        tiny_config(tiny_dataset, tmp_path / "split", resume_from_checkpoint="latest", **settings)
    )
    assert resumed.global_step == 6
    assert_same_weights(whole, resumed)


def test_a_dataset_without_labels_is_refused_before_anything_is_written(tmp_path):
    unlabelled = tmp_path / "unlabelled"
    load_image_dataset("digits").select(range(8)).remove_columns("label").save_to_disk(str(unlabelled))
    with pytest.raises(DatasetSpecError, match="has no labels"):
        train(tiny_config(str(unlabelled), tmp_path / "run", class_conditional=True))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_an_unconditional_checkpoint_cannot_start_a_class_conditional_run(tiny_dataset, tmp_path):
    train(tiny_config(tiny_dataset, tmp_path / "stock", unet="stock", max_train_steps=2))
    reset_accelerate_state()
    with pytest.raises(TrainingConfigError, match="has num_class_embeds=None; this class-conditional"):
        train(
            tiny_config(
                tiny_dataset,
                tmp_path / "run",
                class_conditional=True,
                init_unet=str(tmp_path / "stock"),
                unet_config=None,  # the checkpoint's layout
            )
        )


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("class_dropout", 1.0, r"--class_dropout must lie in \[0, 1\)"),
        ("guidance_scale", -1.0, "must not be negative"),
    ],
)
def test_bad_class_conditional_settings_are_refused_by_flag(tiny_dataset, tmp_path, flag, value, message):
    with pytest.raises(TrainingConfigError, match=message):
        tiny_config(tiny_dataset, tmp_path / "run", class_conditional=True, **{flag: value})


def test_guidance_without_dropped_labels_is_refused_since_nothing_trains_the_null_class(
    tiny_dataset, tmp_path
):
    settings = dict(class_conditional=True, class_dropout=0.0)
    with pytest.raises(TrainingConfigError, match=r"--guidance_scale 2.0 needs a trained null class"):
        tiny_config(tiny_dataset, tmp_path / "run", guidance_scale=2.0, **settings)
    assert tiny_config(tiny_dataset, tmp_path / "run", guidance_scale=1.0, **settings).class_dropout == 0.0
    guided = tiny_config(
        tiny_dataset, tmp_path / "run", guidance_scale=2.0, **{**settings, "class_dropout": 0.1}
    )
    assert guided.guidance_scale == 2.0
