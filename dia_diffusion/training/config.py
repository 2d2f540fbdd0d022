"""The training config: a named preset plus the flags given, resolved into one checked `TrainingConfig`.

`resolve_config` is what `train/train_ddpm.py` and `train/train_text_to_image.py` call: the preset's settings, every
flag that was given, what an `--init_unet` checkpoint or a `--pretrained_model` pipeline decides, then
`validate_config`, which names the first flag whose value cannot work. `run_record` is what a run writes to its folder
as `training_config.json`.
"""

import dataclasses
import importlib.util
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from diffusers.optimization import SchedulerType

from dia_diffusion.training.initial_weights import initial_unet_settings
from dia_diffusion.training.presets import PRESETS, TEXT_TO_IMAGE_PRESETS, UNET_VARIANTS, unet_arguments
from dia_diffusion.training.pretrained_pipeline import pretrained_pipeline_settings

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
# Experiment trackers, through accelerate's `log_with` (as diffusers' example trainers' --report_to); "all" is both.
REPORT_TO = ("tensorboard", "wandb", "all", "none")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
# diffusers' schedules, except piecewise_constant: it needs step rules, which no flag sets.
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType if kind != SchedulerType.PIECEWISE_CONSTANT)
# numpy's seed range; accelerate's set_seed seeds numpy too.
MAX_SEED = 2**32 - 1


class TrainingConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the flag."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run depends on. Field names are the flags of train/train_ddpm.py and train_text_to_image.py."""

    output_dir: str
    preset: str = "demo"
    # data
    dataset: str | None = "digits"
    image_column: str | None = None
    resolution: int = 8
    channels: int = 1
    random_flip: bool = False
    dataloader_num_workers: int = 0
    # class-conditional training: labels from the dataset, dropped to the null class with probability class_dropout;
    # guidance_scale is what the sample grid and the evaluation sample with (see tasks.py)
    class_conditional: bool = False
    class_dropout: float = 0.1
    guidance_scale: float = 1.0
    # text-to-image fine-tuning (see text_to_image_task.py): the pipeline whose UNet is trained and whose VAE, text
    # encoder and noise schedule are used frozen (resolve_config fills in the sha256 of their weights); captions are
    # dropped to "" with probability caption_dropout; random crops unless center_crop; validation_prompts default to
    # the first captions of the dataset
    pretrained_model: str | None = None
    pretrained_model_sha256: str | None = None
    caption_column: str = "text"
    caption_dropout: float = 0.0
    center_crop: bool = True
    cache_latents: bool = False
    validation_prompts: tuple[str, ...] = ()
    # model: UNet2DModel arguments except sample_size / in_channels / out_channels, which follow the data
    unet: str = "dia"
    unet_config: dict[str, Any] = field(default_factory=dict)
    dia_sharing: str = "global"
    dia_reduction: int = 4
    dia_hidden_channels: int | None = None
    dia_gate: str = "sigmoid"
    dia_condition: str = "none"
    dia_global_cell: str = "bottleneck"
    gradient_checkpointing: bool = False
    compile: bool = False
    # start from a saved UNet (see initial_weights.py); resolve_config fills in the sha256 of its weights
    init_unet: str | None = None
    init_unet_sha256: str | None = None
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    variance_type: str = "fixed_small"
    prediction_type: str = "epsilon"
    # Min-SNR-gamma loss weighting (Hang et al. 2023; None: DDPM's uniform weights) and the noise offset that lets a
    # model learn very dark and very bright images (Guttenberg 2023; 0: none)
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    # optimisation (train_batch_size is per process)
    max_train_steps: int = 1000
    train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    # checkpoints, logs, samples, evaluation (0 = only at the end for samples, never for evaluation)
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int = 0
    resume_from_checkpoint: str | None = None
    log_every: int = 10
    report_to: str = "tensorboard"
    sample_every: int = 0
    num_sample_images: int = 64
    sample_inference_steps: int = 1000
    eval_every: int = 0
    eval_feature: str = "classifier"
    eval_num_samples: int = 500
    eval_inference_steps: int = 50
    # publishing: the final pipeline folder and its card, uploaded to the Hugging Face Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def unet_arguments(self) -> dict[str, Any]:
        return unet_arguments(self.unet_config, self.resolution, self.channels)

    def dia_options(self) -> dict[str, Any]:
        return {
            "dia_sharing": self.dia_sharing,
            "dia_reduction": self.dia_reduction,
            "dia_hidden_channels": self.dia_hidden_channels,
            "dia_gate": self.dia_gate,
            "dia_condition": self.dia_condition,
            "dia_global_cell": self.dia_global_cell,
        }

    @property
    def text_to_image(self) -> bool:
        return self.pretrained_model is not None


CLASS_CONDITIONAL_FIELDS = ("class_conditional", "class_dropout", "guidance_scale")
TEXT_TO_IMAGE_FIELDS = (
    "pretrained_model",
    "pretrained_model_sha256",
    "caption_column",
    "caption_dropout",
    "center_crop",
    "cache_latents",
    "validation_prompts",
)
# Settings newer than the first run records: recorded only where they differ from their default, so that those runs
# still resume.
LATER_FIELDS = ("snr_gamma", "noise_offset")

# Settings that may change between invocations of one run without making it a different run. A changed learning
# rate is recorded in `learning_rate_changes` with the step it applies from.
RUN_NEUTRAL_FIELDS = (
    "output_dir",
    "resume_from_checkpoint",
    "learning_rate",
    "learning_rate_changes",
    "max_train_steps",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "compile",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "log_every",
    "report_to",
    "logger",  # what run records written before --report_to called the tracker setting
    "sample_every",
    "guidance_scale",
    "validation_prompts",
    "num_sample_images",
    "sample_inference_steps",
    "eval_every",
    "eval_feature",
    "eval_num_samples",
    "eval_inference_steps",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
)


def resolve_config(preset: str, overrides: dict[str, Any]) -> TrainingConfig:
    """The preset's settings, then every override that is not None."""
    presets = {**PRESETS, **TEXT_TO_IMAGE_PRESETS}
    if preset not in presets:
        raise TrainingConfigError(f"unknown --preset {preset!r}; choose one of {', '.join(presets)}")
    known = {item.name for item in fields(TrainingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainingConfigError(f"unknown setting(s) {', '.join(unknown)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    if "validation_prompts" in given:
        given["validation_prompts"] = tuple(given["validation_prompts"])
    config = TrainingConfig(**{**presets[preset].settings, **given, "preset": preset})
    if (preset in TEXT_TO_IMAGE_PRESETS) != config.text_to_image:
        raise TrainingConfigError(
            f"--preset {preset} fine-tunes a pretrained Stable Diffusion: use train/train_text_to_image.py "
            "--pretrained_model"
            if preset in TEXT_TO_IMAGE_PRESETS
            else f"--pretrained_model needs a text-to-image preset ({', '.join(TEXT_TO_IMAGE_PRESETS)})"
        )
    if config.init_unet is not None:
        config = dataclasses.replace(config, **initial_unet_settings(config.init_unet, config.unet, given))
    if config.text_to_image:
        config = dataclasses.replace(
            config, **pretrained_pipeline_settings(config.pretrained_model, config.unet, given)
        )
    validate_config(config)
    return config


def validate_config(config: TrainingConfig) -> None:
    """Raises TrainingConfigError naming the first flag whose value cannot work."""
    choices = {
        "unet": UNET_VARIANTS,
        "prediction_type": PREDICTION_TYPES,
        "mixed_precision": MIXED_PRECISION_MODES,
        "report_to": REPORT_TO,
        "lr_scheduler": LR_SCHEDULERS,
        "beta_schedule": BETA_SCHEDULES,
        "variance_type": VARIANCE_TYPES,
        "channels": (1, 3),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise TrainingConfigError(
                f"--{name} must be one of {', '.join(map(str, allowed))}, got {getattr(config, name)!r}"
            )
    positive = (
        "resolution",
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "max_grad_norm",
        "checkpointing_steps",
        "log_every",
        "num_sample_images",
        "sample_inference_steps",
        "eval_num_samples",
        "eval_inference_steps",
        "num_train_timesteps",
    )
    for name in positive:
        if not getattr(config, name) > 0:
            raise TrainingConfigError(f"--{name} must be positive, got {getattr(config, name)!r}")
    not_negative = (
        "lr_warmup_steps",
        "checkpoints_total_limit",
        "sample_every",
        "eval_every",
        "dataloader_num_workers",
        "adam_weight_decay",
    )
    for name in not_negative:
        if getattr(config, name) < 0:
            raise TrainingConfigError(f"--{name} must not be negative, got {getattr(config, name)!r}")
    for name in ("class_dropout", "caption_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise TrainingConfigError(f"--{name} must lie in [0, 1), got {getattr(config, name)!r}")
    if config.snr_gamma is not None and not config.snr_gamma > 0:
        raise TrainingConfigError(f"--snr_gamma must be positive, got {config.snr_gamma!r}")
    if config.noise_offset < 0:
        raise TrainingConfigError(f"--noise_offset must not be negative, got {config.noise_offset!r}")
    if config.text_to_image:
        validate_text_to_image(config)
    if config.guidance_scale < 0:
        raise TrainingConfigError(f"--guidance_scale must not be negative, got {config.guidance_scale!r}")
    if config.class_conditional and config.class_dropout == 0 and config.guidance_scale != 1:
        # Guidance extrapolates from the null class's prediction, which only dropped labels train.
        raise TrainingConfigError(
            f"--guidance_scale {config.guidance_scale!r} needs a trained null class: give --class_dropout > 0 "
            "(0.1 is usual), or sample with --guidance_scale 1"
        )
    if not 0.0 < config.ema_decay < 1.0:
        raise TrainingConfigError(f"--ema_decay must be between 0 and 1, got {config.ema_decay!r}")
    if not 0 <= config.seed <= MAX_SEED:
        raise TrainingConfigError(f"--seed must be between 0 and {MAX_SEED}, got {config.seed!r}")
    if config.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise TrainingConfigError(
            f"--report_to {config.report_to} needs wandb: pip install 'dia-diffusion[wandb]' (or pip install wandb)"
        )
    if not config.push_to_hub and (config.hub_model_id is not None or config.hub_private):
        flag = "--hub_model_id" if config.hub_model_id is not None else "--hub_private"
        raise TrainingConfigError(f"{flag} applies only with --push_to_hub")
    # A sampler cannot take more steps than the schedule has timesteps; diffusers would refuse only at sampling time.
    sampling_steps = ["sample_inference_steps"] + (["eval_inference_steps"] if config.eval_every else [])
    for name in sampling_steps:
        if getattr(config, name) > config.num_train_timesteps:
            raise TrainingConfigError(
                f"--{name} must be at most the {config.num_train_timesteps} training timesteps, "
                f"got {getattr(config, name)!r}"
            )
    # Each level but the last halves the image, so the resolution must survive len(block_out_channels) - 1 halvings.
    levels = len(config.unet_config.get("block_out_channels", ()))
    divisor = 2 ** max(levels - 1, 0)
    if config.resolution % divisor:
        raise TrainingConfigError(
            f"--resolution {config.resolution} cannot be divided by {divisor}, which the UNet's {levels} levels "
            f"need; use a multiple of {divisor}"
        )


def validate_text_to_image(config: TrainingConfig) -> None:
    if config.dataset is None:
        raise TrainingConfigError(
            "--dataset is required: an image folder with metadata.jsonl (file_name, text) or a hub dataset"
        )
    if config.class_conditional:
        raise TrainingConfigError("--class_conditional does not apply to text-to-image fine-tuning")
    if config.init_unet is not None:
        raise TrainingConfigError(
            "--init_unet does not apply here: --pretrained_model names the model to start from"
        )
    if config.eval_every:
        raise TrainingConfigError("--eval_every: text-to-image runs have no in-training evaluation")
    if config.cache_latents and (config.random_flip or not config.center_crop):
        flag = "--random_flip" if config.random_flip else "random crops (pass --center_crop)"
        raise TrainingConfigError(
            f"--cache_latents encodes every image once, so it cannot take {flag}: each epoch would need new latents"
        )


def run_record(config: TrainingConfig, num_processes: int) -> dict[str, Any]:
    """What `training_config.json` holds: the resolved config, the process count the data order depends on, and
    the learning rates the optimizer used: `{"step": s, "learning_rate": lr}` means lr from step s + 1 on (a resumed
    run takes the history from its checkpoint, see `resume`)."""
    learning_rate_changes = [{"step": 0, "learning_rate": config.learning_rate}]
    settings = asdict(config)
    # A run without them records none of them, as runs recorded before they existed did: those still resume.
    unused = (() if config.class_conditional else CLASS_CONDITIONAL_FIELDS) + (
        () if config.text_to_image else TEXT_TO_IMAGE_FIELDS
    )
    if config.text_to_image and not config.class_conditional:
        unused = tuple(name for name in unused if name != "guidance_scale")  # the validation prompts' scale
    defaults = TrainingConfig(output_dir="")
    unused += tuple(name for name in LATER_FIELDS if getattr(config, name) == getattr(defaults, name))
    for name in unused:
        del settings[name]
    return {**settings, "num_processes": num_processes, "learning_rate_changes": learning_rate_changes}
