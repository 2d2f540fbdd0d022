"""What a finished run publishes: the pipeline folder's model card, and, with `--push_to_hub`, the upload of that
folder (pipeline, card, the sample grid the card shows and the run's record; never the checkpoints).

The card is written into the pipeline while it is staged (`pipeline_saver`), so it lands with the weights it
describes. A push that fails leaves everything saved locally; `train_ddpm.py` reports it in one line.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dia_diffusion.data.image_datasets import CIFAR10_HUB_NAME, FASHION_MNIST_HUB_NAME
from dia_diffusion.evaluation.feature_extractors import ClassifierFeatures, Dinov2Features, InceptionFeatures
from dia_diffusion.hub.model_card import (
    CLASS_CONDITIONAL_PIPELINE,
    TEXT_TO_IMAGE_PIPELINE,
    UNCONDITIONAL_PIPELINE,
    CardTask,
    pipeline_card_only,
    write_model_card,
)
from dia_diffusion.hub.upload import HubPushError, create_hub_repo, hub_repo_id, is_hub_name, upload_to_hub
from dia_diffusion.models.model_facts import model_facts
from dia_diffusion.training.config import CLASS_CONDITIONAL_FIELDS, TEXT_TO_IMAGE_FIELDS, TrainingConfig

METRIC_NAMES = {
    extractor.metric_key: extractor.metric_name
    for extractor in (InceptionFeatures, Dinov2Features, ClassifierFeatures)
}
FEATURES = {
    "fid": "Inception-v3 pool features (the TF-ported FID weights)",
    "fd_dinov2": "DINOv2 features",
    "fd_classifier": "a small classifier trained by dia_diffusion on the same dataset (not Inception)",
}
# The settings a card lists; training_config.json (uploaded beside it) holds all of them.
CARD_SETTINGS = (
    "preset",
    "dataset",
    "resolution",
    "channels",
    "unet",
    "init_unet",
    "num_train_timesteps",
    "beta_schedule",
    "prediction_type",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_grad_norm",
    "ema_decay",
    "mixed_precision",
    "seed",
)
DATASET_HUB_NAMES = {"fashion_mnist": FASHION_MNIST_HUB_NAME, "cifar10": CIFAR10_HUB_NAME}
DATASET_DESCRIPTIONS = {"digits": "scikit-learn's 8×8 digits"}
SAMPLES_DIRNAME = "samples"
# What a push uploads besides the card and the sample grid it shows: the pipeline's components (a Stable Diffusion
# pipeline has more of them), never the checkpoints.
PUSHED_FILES = [
    "model_index.json",
    "unet/*",
    "scheduler/*",
    "README.md",
    "training_config.json",
    "metrics.jsonl",
]
STABLE_DIFFUSION_FILES = ["vae/*", "text_encoder/*", "tokenizer/*", "safety_checker/*", "feature_extractor/*"]


def sample_grid_name(step: int) -> str:
    return f"{SAMPLES_DIRNAME}/step-{step:07d}.png"


def last_metric(output_dir: Path, config: TrainingConfig) -> dict[str, Any] | None:
    """The last in-training metric of `metrics.jsonl`, with what it was measured in."""
    path = output_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    for row in reversed(rows):
        for key, name in METRIC_NAMES.items():
            if key in row:
                return {
                    "key": key,
                    "name": name,
                    "value": row[key],
                    "step": row["step"],
                    "feature_extractor": FEATURES[key],
                    "num_samples": config.eval_num_samples,
                    "sampler": f"DDIM, {config.eval_inference_steps} steps, EMA weights"
                    + (
                        f", every class in turn, guidance scale {config.guidance_scale}"
                        if config.class_conditional
                        else ""
                    ),
                    "reference": f"the training split of `{config.dataset}`",
                }
    return None


def run_card(
    folder: Path,
    config: TrainingConfig,
    unet: torch.nn.Module,
    step: int,
    source: str,
) -> Path:
    """Writes the card of the pipeline a run saved into `folder` (its staging folder, or the output folder)."""
    output_dir = Path(config.output_dir)
    grid = sample_grid_name(step)
    hub_dataset = DATASET_HUB_NAMES.get(config.dataset, config.dataset)
    task = card_task(config)
    names = [
        *CARD_SETTINGS,
        *(CLASS_CONDITIONAL_FIELDS if config.class_conditional else ()),
        *(TEXT_TO_IMAGE_FIELDS if config.text_to_image else ()),
    ]
    settings = {"steps trained": step, **{name: getattr(config, name) for name in names}}
    facts = model_facts(
        unet,
        task,
        source,
        base_model=config.init_unet or config.pretrained_model,
        datasets=(hub_dataset,) if is_hub_name(hub_dataset) else (),
        dataset_description=DATASET_DESCRIPTIONS.get(config.dataset, f"`{config.dataset}`"),
        training=settings,
        metric=last_metric(output_dir, config),
        sample_grid=grid if (output_dir / grid).is_file() else None,
    )
    return write_model_card(folder, facts)


def card_task(config: TrainingConfig) -> CardTask:
    if config.text_to_image:
        return TEXT_TO_IMAGE_PIPELINE
    return CLASS_CONDITIONAL_PIPELINE if config.class_conditional else UNCONDITIONAL_PIPELINE


def pipeline_saver(pipeline: DiffusionPipeline, config: TrainingConfig, step: int) -> Callable[[str], None]:
    """The `save_pretrained` that `publish_pipeline` calls: the pipeline, then its one card at the root."""

    def save(folder: str) -> None:
        with pipeline_card_only():
            pipeline.save_pretrained(folder)
        run_card(Path(folder), config, pipeline.unet, step, config.output_dir)

    return save


def push_run(config: TrainingConfig, unet: torch.nn.Module, step: int) -> str:
    """Uploads the run's pipeline folder with its card to `--hub_model_id` (default: the folder's name); the card is
    written again first, naming the hub repository as where to load it from. Returns the repository's id."""
    output_dir = Path(config.output_dir)
    repo_id = create_hub_repo(hub_repo_id(output_dir, config.hub_model_id), config.hub_private)
    run_card(output_dir, config, unet, step, repo_id)
    try:
        grid = sample_grid_name(step)
        upload_to_hub(
            output_dir,
            repo_id,
            [*PUSHED_FILES, *(STABLE_DIFFUSION_FILES if config.text_to_image else ()), grid],
            f"dia_diffusion: {step} steps of {config.preset}",
        )
    except HubPushError:
        run_card(output_dir, config, unet, step, config.output_dir)  # the local card names the local folder
        raise
    return repo_id
