"""ClassConditionalPipeline (DiTPipeline's API on a class-conditional UNet) against classifier-free guidance written
out by hand; the labels class-conditional training reads from a dataset; the classes a samples folder records; and
class accuracy, the fraction of the samples of each class that the feature classifier calls that class."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_GREY_UNET, load_script
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.data.class_labels import class_names
from dia_diffusion.data.decoded_images import training_pixels
from dia_diffusion.data.image_datasets import DatasetSpecError, load_image_dataset
from dia_diffusion.evaluation.class_accuracy import class_accuracy
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline, ClassSampling
from dia_diffusion.pipelines.sampling import sample_to_folder

NUM_CLASSES = 3


def unet(num_class_embeds: int | None = NUM_CLASSES + 1) -> DIAUNet2DModel:
    torch.manual_seed(0)
    return DIAUNet2DModel(**TINY_GREY_UNET, num_class_embeds=num_class_embeds).eval()


def pipeline(scheduler=None, **options) -> ClassConditionalPipeline:
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=50)
    built = ClassConditionalPipeline(unet=unet(), scheduler=scheduler, **options)
    built.set_progress_bar_config(disable=True)
    return built


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 3.0])
def test_guidance_combines_the_labelled_and_the_null_class_prediction_as_written_by_hand(guidance_scale):
    sampler = pipeline()
    labels = [2, 0]
    images = sampler(labels, guidance_scale, generators(5, 6), num_inference_steps=3, output_type="pt").images

    scheduler = DDIMScheduler.from_config(sampler.scheduler.config)
    scheduler.set_timesteps(3)
    x = torch.stack([torch.randn(1, 8, 8, generator=generator) for generator in generators(5, 6)])
    model = sampler.unet
    with torch.no_grad():
        for t in scheduler.timesteps:
            conditional = model(x, t, torch.tensor(labels)).sample
            unconditional = model(
                x, t, torch.tensor([NUM_CLASSES] * 2)
            ).sample  # the null class is the last id
            guided = unconditional + guidance_scale * (conditional - unconditional)
            x = scheduler.step(guided, t, x).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-5)


def test_an_image_depends_on_its_own_generator_and_label_not_on_the_batch():
    sampler = pipeline(DDPMScheduler(num_train_timesteps=50))
    batch = sampler([0, 1, 2], 2.0, generators(1, 2, 3), num_inference_steps=4, output_type="pt").images
    alone = sampler([1], 2.0, generators(2), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)
    other_label = sampler([2], 2.0, generators(2), num_inference_steps=4, output_type="pt").images
    assert (other_label - alone).abs().max() > 1e-3


def test_class_names_map_to_ids_and_are_saved_with_the_pipeline(tmp_path):
    sampler = pipeline(id2label={0: "zero, nought", 1: "one", 2: "two"})
    assert sampler.get_label_ids(["nought", "two"]) == [0, 2] and sampler.get_label_ids("one") == [1]
    with pytest.raises(ValueError, match="unknown class name"):
        sampler.get_label_ids("three")
    sampler.save_pretrained(tmp_path)
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is DIAUNet2DModel and loaded.labels == sampler.labels


def test_bad_labels_and_a_unet_without_classes_are_refused():
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\), got \[3\]"):
        pipeline()([3], num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale must not be negative"):
        pipeline()([0], guidance_scale=-1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a UNet with num_class_embeds"):
        ClassConditionalPipeline(unet=unet(None), scheduler=DDIMScheduler())


def test_training_items_carry_the_dataset_labels(tiny_dataset):
    dataset = load_image_dataset(tiny_dataset)
    assert class_names(dataset, tiny_dataset) == [str(digit) for digit in range(10)]
    items = training_pixels(dataset, 8, 1, with_labels=True)
    assert [int(items[index]["class_labels"]) for index in range(len(dataset))] == dataset["label"]
    assert "class_labels" not in training_pixels(dataset, 8, 1)[0]


def test_a_dataset_without_labels_is_refused_in_one_line(tmp_path):
    unlabelled = load_image_dataset("digits").select(range(4)).remove_columns("label")
    with pytest.raises(DatasetSpecError, match="^--dataset 'x' has no labels \\(columns: image\\)"):
        class_names(unlabelled, "x")


class ScoresAreFeatures(torch.nn.Module):
    """A feature extractor whose features are already class scores, so that the prediction is their argmax."""

    def __init__(self) -> None:
        super().__init__()
        self.network = torch.nn.Linear(1, 1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features


def test_class_accuracy_averages_each_class_s_hit_rate():
    # Class 0: 2 of 3 samples predicted 0; class 2: 1 of 1. The mean over classes is (2/3 + 1) / 2, not 3/4.
    scores = np.array([[5, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]], dtype=np.float32)
    result = class_accuracy(ScoresAreFeatures(), scores, [0, 0, 0, 2])
    assert result["class_accuracy_per_class"] == pytest.approx({0: 2 / 3, 2: 1.0})
    assert result["class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="4 samples but 3 labels"):
        class_accuracy(ScoresAreFeatures(), scores, [0, 0, 0])


def test_a_samples_folder_of_a_class_conditional_model_records_each_image_s_class(tmp_path):
    pipeline(DDPMScheduler(num_train_timesteps=20)).save_pretrained(tmp_path / "model")
    sample_to_folder(
        tmp_path / "model",
        tmp_path / "samples",
        num_inference_steps=2,
        num_images=5,
        batch_size=2,
        classes=ClassSampling((2, 0), guidance_scale=1.5),
    )
    record = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert record["class_labels"] == [2, 0, 2, 0, 2] and record["guidance_scale"] == 1.5
    balanced = ClassSampling()
    assert balanced.labels(list(range(7)), NUM_CLASSES) == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"--class_labels must lie in \[0, 3\), got \[5\]"):
        sample_to_folder(tmp_path / "model", tmp_path / "bad", num_images=1, classes=ClassSampling((5,)))


def test_sample_py_takes_class_names_from_the_model_s_id2label(tmp_path, capsys):
    sample_script = load_script("pipelines/sample.py")
    named = pipeline(DDPMScheduler(num_train_timesteps=20), id2label={0: "Trouser", 1: "Ankle boot", 2: "2"})
    named.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--num_inference_steps", "2", "--num_images", "4"]
    # A whole number is an id (class 1 here, although class 2 is named "2"); anything else is a name.
    assert (
        sample_script.main(
            [*argv, "--class_labels", "Ankle boot", "Trouser", "1", "--output", str(tmp_path / "a")]
        )
        == 0
    )
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["class_labels"] == [1, 0, 1, 1]
    assert sample_script.main([*argv, "--class_labels", "Boot", "--output", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error
        == "sample.py: error: unknown class name(s) ['Boot']; the pipeline knows ['2', 'Ankle boot', 'Trouser']"
    )
    assert not (tmp_path / "b").exists()


def test_class_labels_are_refused_for_an_unconditional_model(tmp_path):
    torch.manual_seed(0)
    unconditional = DDPMPipeline(unet=unet(None), scheduler=DDPMScheduler(num_train_timesteps=20))
    unconditional.save_pretrained(tmp_path / "model")
    with pytest.raises(
        ValueError,
        match="^--class_labels and --guidance_scale need a class-conditional model; this one has none$",
    ):
        sample_to_folder(tmp_path / "model", tmp_path / "out", num_images=1, classes=ClassSampling((1,)))


def test_labels_and_guidance_are_checked_against_the_pipeline():
    unconditional = DDPMPipeline(unet=unet(None), scheduler=DDPMScheduler(num_train_timesteps=20))
    assert ClassSampling().for_pipeline(unconditional) == ClassSampling()
    with pytest.raises(ValueError, match="need a class-conditional model"):
        ClassSampling(guidance_scale=2.0).for_pipeline(unconditional)
    conditional = pipeline()
    for scale in (0.0, 0.5, 4.0):
        assert ClassSampling((0, 2), scale).for_pipeline(conditional) == ClassSampling((0, 2), scale)
    with pytest.raises(ValueError, match=r"^--guidance_scale must not be negative, got -0\.5$"):
        ClassSampling(guidance_scale=-0.5).for_pipeline(conditional)
    with pytest.raises(ValueError, match=r"^--class_labels must lie in \[0, 3\), got \[3, -1\]$"):
        ClassSampling((2, 3, -1)).for_pipeline(conditional)
