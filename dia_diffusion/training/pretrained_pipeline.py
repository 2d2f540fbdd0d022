"""`--pretrained_model`: the Stable Diffusion pipeline a text-to-image run fine-tunes, a local folder or a hub name.

The pipeline decides the model: its UNet is trained (a stock UNet is retrofitted with DIA, with the identity gate
unless `--dia_gate` says otherwise, so that step 0 computes exactly what the checkpoint computes; a DIA UNet, from
an earlier fine-tune, continues as it is), its VAE and text encoder are used frozen, and its scheduler's noise
schedule is the training schedule. The run record holds the source as given and `pretrained_model_sha256`, the
sha256 of the weights of those three components, so a run whose source has changed since it started is refused on
resume.
"""

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline, StableDiffusionPipeline

from dia_diffusion.models.unet_2d_condition_dia import DIAUNet2DConditionModel
from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.file_digests import folder_weights_sha256
from dia_diffusion.training.initial_weights import saved_dia_settings, settled

PIPELINE_CLASS = StableDiffusionPipeline.__name__
# The components whose weights training reads; the sha256 of the run record covers them.
TRAINED_FROM = ("unet", "vae", "text_encoder")


class PretrainedPipelineError(ValueError):
    """`--pretrained_model` names nothing this trainer can fine-tune, or a setting contradicts it; one line."""


def locate_pipeline_folder(source: str) -> Path:
    """The pipeline folder: `source` itself, or its hub snapshot (diffusers' own choice of files)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PretrainedPipelineError(
                f"--pretrained_model '{source}' is a folder without model_index.json"
            )
        return path
    if path.exists():
        raise PretrainedPipelineError(
            f"--pretrained_model '{source}' is a file; pass a pipeline folder or a hub name"
        )
    return hub_snapshot(source)


@functools.cache
def hub_snapshot(name: str) -> Path:
    """The hub snapshot of pipeline `name`, fetched once per process: the settings read and the weights hashed at
    the start are those of the very snapshot that training loads."""
    try:
        return Path(DiffusionPipeline.download(name))
    except (OSError, ValueError) as error:
        raise PretrainedPipelineError(
            f"--pretrained_model '{name}' is not a local folder, and the Hugging Face hub cannot provide it: "
            f"{first_line(error)}"
        ) from None


def pretrained_pipeline_settings(source: str, unet_variant: str, given: dict[str, Any]) -> dict[str, Any]:
    """The training settings that the pipeline at `source` decides, for a run of `--unet unet_variant`; `given`
    holds the settings given explicitly. Raises PretrainedPipelineError naming the first one that contradicts it."""
    folder = locate_pipeline_folder(source)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        raise PretrainedPipelineError(
            f"--pretrained_model '{source}' holds a {index.get('_class_name')}; this trainer fine-tunes a "
            f"{PIPELINE_CLASS} (Stable Diffusion 1.x and 2.x)"
        )
    missing = [name for name in (*TRAINED_FROM, "tokenizer", "scheduler") if name not in index]
    if missing:
        raise PretrainedPipelineError(f"--pretrained_model '{source}' has no {', '.join(missing)}")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    settings: dict[str, Any] = {
        "num_train_timesteps": scheduler.get("num_train_timesteps", 1000),
        "beta_schedule": scheduler.get("beta_schedule", "linear"),
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "pretrained_model_sha256": pipeline_weights_sha256(folder),
    }
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if unet.get("_class_name") == DIAUNet2DConditionModel.__name__:
        settings.update(saved_dia_settings(unet, f"--pretrained_model '{source}'", PretrainedPipelineError))
    return settled(settings, unet_variant, given, f"--pretrained_model '{source}'", PretrainedPipelineError)


def pipeline_weights_sha256(folder: Path) -> str:
    """sha256 of the lines '<component> <sha256 of its weights>' of the components training reads."""
    listing = "".join(f"{name} {folder_weights_sha256(folder / name)}\n" for name in TRAINED_FROM)
    return hashlib.sha256(listing.encode()).hexdigest()


def load_pretrained_pipeline(source: str) -> StableDiffusionPipeline:
    """The whole pipeline, in fp32, its UNet as saved (stock or DIA)."""
    folder = locate_pipeline_folder(source)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as error:
        raise PretrainedPipelineError(
            f"--pretrained_model '{source}' cannot be loaded: {first_line(error)}"
        ) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
