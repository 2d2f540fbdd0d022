"""One training run of a diffusion model, for every task: a resolved `TrainingConfig` in, a diffusers pipeline folder
out (a `DDPMPipeline`, a `ClassConditionalPipeline`, or a fine-tuned `StableDiffusionPipeline`; see tasks.py).

`config.resolve_config` turns a preset plus flags into the config; `train` runs it under accelerate:
1. accelerator  2. inputs checked (nothing is written before they pass)  3. model, EMA, optimizer, data
4. resume  5. the loop  6. the final EMA pipeline.

Exactness on resume rests on three choices: the data order (and a text-to-image item's crop) is a pure function of
(seed, epoch); every random draw of the loop (flips, latent samples, noise, timesteps, dropout) comes from the global
RNGs that accelerate checkpoints per process; and sampling/evaluation run inside `torch.random.fork_rng`, so they
never shift those streams.
"""

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dia_diffusion.data.class_labels import class_names
from dia_diffusion.data.image_datasets import load_image_dataset
from dia_diffusion.evaluation.feature_extractors import MissingWeightsError
from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.runtime.folder_lock import LOCK_FILENAME
from dia_diffusion.runtime.output_files import new_entries_removed_on_failure
from dia_diffusion.training.checkpointing import (
    CHECKPOINTS_DIRNAME,
    check_output_dir,
    check_resume_checkpoint,
    checkpoint_metrics_window,
    checkpoint_step,
    claim_output_dir,
    load_resume_checkpoint,
    publish_pipeline,
    read_run_record,
    save_checkpoint,
    write_run_record,
)
from dia_diffusion.training.config import RUN_NEUTRAL_FIELDS, TrainingConfig, TrainingConfigError, run_record
from dia_diffusion.training.data_order import make_dataloader
from dia_diffusion.training.ema import ema_weights, make_ema
from dia_diffusion.training.metrics_log import (
    METRICS_FILENAME,
    TRACKERS,
    LogWindow,
    MetricsLog,
    tracker_hyperparameters,
    tracker_init_kwargs,
)
from dia_diffusion.training.pretrained_pipeline import load_pretrained_pipeline
from dia_diffusion.training.publishing import pipeline_saver
from dia_diffusion.training.sample_grid import write_sample_grid
from dia_diffusion.training.step import check_finite, training_step
from dia_diffusion.training.tasks import ClassConditionalTask, UnconditionalTask
from dia_diffusion.training.text_to_image_task import TextToImageTask

# The trackers' project: the training script's name.
TRACKER_PROJECTS = {False: "train_ddpm", True: "train_text_to_image"}
SAMPLES_DIRNAME = "samples"


@dataclass
class TrainingResult:
    global_step: int
    unet: UNet2DModel  # the trained (non-EMA) weights
    ema: EMAModel


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The config, not the launcher's environment, decides precision and compilation.

    A precision the device does not run is refused: given fp16 on a CPU, accelerate trains in fp32 without a word,
    and the run record would claim fp16. (bf16 on a CPU does run, under torch.autocast.)
    """
    output_dir = Path(config.output_dir)
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            dynamo_backend="inductor" if config.compile else "no",
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
            ),
            # Stepped by hand once per optimizer step; accelerate would otherwise step it once per process.
            step_scheduler_with_optimizer=False,
            log_with=TRACKERS[config.report_to] or None,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
            ),
        )
    except ValueError as error:  # accelerate's refusal of a precision the device lacks
        if config.mixed_precision == "no":
            raise
        raise TrainingConfigError(f"--mixed_precision {config.mixed_precision}: {error}") from None
    if config.mixed_precision != "no" and not accelerator.native_amp:
        raise TrainingConfigError(
            f"--mixed_precision {config.mixed_precision} does not run on {accelerator.device.type}: accelerate "
            "would train in fp32; use --mixed_precision no (or bf16)"
        )
    return accelerator


def train(config: TrainingConfig) -> TrainingResult:
    """Runs (or resumes) the training described by `config`; every process of an accelerate launch calls it."""
    output_dir = Path(config.output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIRNAME

    # 1. Accelerator.
    accelerator = make_accelerator(config)
    # Identical on every process, so every process builds the same initial weights and EMA.
    set_seed(config.seed)

    # 2. Inputs: every check that can fail runs before the first file is written; the folder's first.
    record = run_record(config, accelerator.num_processes)
    resuming = config.resume_from_checkpoint is not None
    if resuming:
        check_resume_checkpoint(checkpoints_dir, config.resume_from_checkpoint, record, RUN_NEUTRAL_FIELDS)
    check_output_dir(output_dir, record, RUN_NEUTRAL_FIELDS, resuming)
    dataset = training_dataset(config, accelerator.num_processes)
    task = make_task(config, dataset, accelerator)
    unet = task.initial_unet()
    evaluator = make_evaluator(config, accelerator) if config.eval_every else None
    accelerator.wait_for_everyone()

    # 3. Model, EMA, optimizer, data.
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema, optimizer = make_ema(unet, config), make_optimizer(unet, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    noise_scheduler = task.noise_scheduler()
    train_dataloader = make_dataloader(task.training_items(dataset), config)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    # From here on each process draws its own flips, noise and timesteps.
    set_seed(config.seed, device_specific=True)

    # 4. The folder becomes this run's (a second training into it is refused until this one ends), then resume.
    folder_lock = (
        claim_output_dir(output_dir, record, RUN_NEUTRAL_FIELDS, resuming)
        if accelerator.is_main_process
        else None
    )
    progress = metrics = None
    # A start that fails (a full disk, Ctrl-C) takes back what it wrote: the same command can run again.
    start_up = (
        new_entries_removed_on_failure(output_dir, keep=(LOCK_FILENAME,))
        if accelerator.is_main_process
        else nullcontext()
    )
    try:
        with start_up:
            global_step, record, open_window = resume(
                accelerator, config, checkpoints_dir, lr_scheduler, ema, record
            )
            if accelerator.is_main_process:
                write_run_record(output_dir, record)
            accelerator.print(run_summary(config, accelerator.num_processes, len(dataset), unet))
            if accelerator.is_main_process:
                metrics = MetricsLog(output_dir / METRICS_FILENAME, keep_until_step=global_step)
            if config.report_to != "none":
                accelerator.init_trackers(
                    TRACKER_PROJECTS[config.text_to_image],
                    config=tracker_hyperparameters(config),
                    init_kwargs=tracker_init_kwargs(config),
                )

        # 5. The loop.
        progress = tqdm(
            total=config.max_train_steps,
            initial=global_step,
            desc="steps",
            disable=not accelerator.is_main_process,
        )
        log_window = LogWindow(
            config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        )
        log_window.restore(open_window)
        keep_checkpoints = config.checkpoints_total_limit or None
        epoch, batches_to_skip = divmod(
            global_step * config.gradient_accumulation_steps, len(train_dataloader)
        )
        clock = time.perf_counter()
        while global_step < config.max_train_steps:
            train_dataloader.set_epoch(epoch)
            batches = train_dataloader
            if batches_to_skip:
                # Resuming mid-epoch: skip the batches this epoch already used without loading them.
                batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
                batches_to_skip = 0
            for batch in batches:
                with accelerator.accumulate(unet):
                    losses = training_step(accelerator, unet, optimizer, noise_scheduler, batch, config, task)
                    check_finite(losses, global_step + 1, checkpoints_dir)
                log_window.add_batch(losses.mean().item())
                if not accelerator.sync_gradients:
                    continue
                learning_rate = optimizer.param_groups[0]["lr"]  # what this step used
                lr_scheduler.step()
                ema.step(unet.parameters())
                global_step += 1
                log_window.add_step(time.perf_counter() - clock)
                progress.update(1)

                is_last = global_step == config.max_train_steps
                row: dict[str, float] = {}
                if global_step % config.log_every == 0 or is_last:
                    row = log_window.close(learning_rate)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{learning_rate:.2e}")
                if (config.sample_every and global_step % config.sample_every == 0) or is_last:
                    write_samples(accelerator, task, unet, ema, global_step)
                if evaluator is not None and (global_step % config.eval_every == 0 or is_last):
                    with ema_weights(ema, unet, accelerator.device):
                        row.update(evaluator(task.pipeline(accelerator.unwrap_model(unet))))
                if row:
                    accelerator.log(row, step=global_step)
                    if metrics is not None:
                        metrics.write(global_step, row)
                # After the step's metrics: a checkpoint never lacks a row that the resumed run would not log again.
                if global_step % config.checkpointing_steps == 0 or is_last:
                    window = log_window.state()
                    save_checkpoint(
                        accelerator, checkpoints_dir, global_step, keep_checkpoints, record, window
                    )
                if is_last:
                    break
                clock = time.perf_counter()
            epoch += 1

        # 6. The final pipeline, with the EMA weights.
        with ema_weights(ema, unet, accelerator.device):
            if accelerator.is_main_process:
                pipeline = task.published_pipeline(accelerator.unwrap_model(unet))
                publish_pipeline(pipeline_saver(pipeline, config, global_step), output_dir)
        accelerator.wait_for_everyone()
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        accelerator.end_training()
        if folder_lock is not None:
            folder_lock.release()
    return TrainingResult(global_step=global_step, unet=accelerator.unwrap_model(unet), ema=ema)


def write_samples(
    accelerator: Accelerator, task: UnconditionalTask, unet: torch.nn.Module, ema: EMAModel, step: int
) -> None:
    """The sample grid of `step`, from the EMA weights (see tasks.py for what each task shows)."""
    with ema_weights(ema, unet, accelerator.device):
        if accelerator.is_main_process:
            pipeline = task.pipeline(accelerator.unwrap_model(unet))
            grid_path = Path(task.config.output_dir) / SAMPLES_DIRNAME / f"step-{step:07d}.png"
            write_sample_grid(task, pipeline, task.config, grid_path)
    accelerator.wait_for_everyone()


def run_summary(config: TrainingConfig, num_processes: int, num_images: int, unet: torch.nn.Module) -> str:
    images_per_step = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    return (
        f"effective batch size {images_per_step} = {config.train_batch_size} per process x {num_processes} "
        f"processes x {config.gradient_accumulation_steps} accumulation steps; {num_images} images; "
        f"{sum(p.numel() for p in unet.parameters()):,} parameters ({config.unet} UNet)"
    )


def resume(
    accelerator: Accelerator,
    config: TrainingConfig,
    checkpoints_dir: Path,
    lr_scheduler: AcceleratedScheduler,
    ema: EMAModel,
    record: dict[str, Any],
) -> tuple[int, dict[str, Any], dict[str, float] | None]:
    """Loads what --resume_from_checkpoint names (weights, optimizer, LR schedule, EMA, every process's RNG states)
    and continues at --learning_rate; returns the step to continue from, the run record, with the learning-rate
    history as of that step, and the metrics window that was open at that step."""
    if config.resume_from_checkpoint is None:
        return 0, record, None
    spec = config.resume_from_checkpoint
    path = load_resume_checkpoint(
        accelerator, checkpoints_dir, spec, lambda message: warn(accelerator, message)
    )
    if path is None:
        return 0, record, None
    global_step = checkpoint_step(path)
    if global_step > config.max_train_steps:
        # Nothing would train, and the final pipeline would publish this later step's weights as a shorter run's.
        raise TrainingConfigError(
            f"--resume_from_checkpoint: {path.name} is at step {global_step}, past --max_train_steps "
            f"{config.max_train_steps}; raise --max_train_steps or train into a new --output_dir"
        )
    # accelerate loads registered objects onto the CPU.
    ema.to(accelerator.device)
    accelerator.print(f"resumed from {path} at step {global_step}")
    changes = continue_learning_rate(lr_scheduler, config.learning_rate, global_step, read_run_record(path))
    if len(changes) > 1 and changes[-1]["step"] == global_step:
        accelerator.print(
            f"learning rate {changes[-2]['learning_rate']:g} -> {config.learning_rate:g} from step {global_step + 1}"
        )
    return global_step, {**record, "learning_rate_changes": changes}, checkpoint_metrics_window(path)


def continue_learning_rate(
    lr_scheduler: AcceleratedScheduler,
    learning_rate: float,
    step: int,
    checkpoint_record: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Sets the loaded schedule's base rate to `learning_rate` and returns the run's learning-rate changes.

    A loaded checkpoint brings back the learning rate it was trained with; a lower one on resume is the way out of
    a NaN loss, so the schedule continues from its position with the new base rate (every diffusers schedule is a
    torch LambdaLR: lr = base rate x factor(step)). The changes so far come from the checkpoint's run record (a
    checkpoint without one ran at its restored rate from the start).
    """
    schedule = lr_scheduler.scheduler  # the torch scheduler inside accelerate's wrapper
    restored = schedule.base_lrs[0]
    initial = [{"step": 0, "learning_rate": restored}]
    changes = (checkpoint_record or {}).get("learning_rate_changes") or initial
    if learning_rate == restored:
        return changes
    schedule.base_lrs = [learning_rate] * len(schedule.base_lrs)
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(schedule.last_epoch)
    return [*changes, {"step": step, "learning_rate": learning_rate}]


def warn(accelerator: Accelerator, message: str) -> None:
    """One line on stderr, from the main process only."""
    if accelerator.is_main_process:
        print(f"warning: {message}", file=sys.stderr)


def training_dataset(config: TrainingConfig, num_processes: int) -> datasets.Dataset:
    """The training split, with the captions of a text-to-image run; at least one batch of it."""
    caption_column = config.caption_column if config.text_to_image else None
    dataset = load_image_dataset(config.dataset, "train", config.image_column, caption_column)
    images_per_step = config.train_batch_size * num_processes
    if len(dataset) < images_per_step:
        raise TrainingConfigError(
            f"--dataset {config.dataset!r} has {len(dataset)} images, fewer than one batch of {images_per_step} "
            f"(--train_batch_size {config.train_batch_size} x {num_processes} processes)"
        )
    return dataset


def make_task(
    config: TrainingConfig, dataset: datasets.Dataset, accelerator: Accelerator
) -> UnconditionalTask:
    """The run's task (see tasks.py), with what it runs itself on the training device."""
    if config.text_to_image:
        task = TextToImageTask(config, load_pretrained_pipeline(config.pretrained_model), dataset)
    elif config.class_conditional:
        task = ClassConditionalTask(config, class_names(dataset, config.dataset))
    else:
        task = UnconditionalTask(config)
    task.place(accelerator)
    return task


def make_optimizer(unet: UNet2DModel, config: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay, fused=True
    )


def make_evaluator(config: TrainingConfig, accelerator: Accelerator) -> PipelineEvaluator:
    """The metric of `--eval_every`, e.g. FD (classifier features): the same code as `dia-diffusion fid`.

    Its feature extractor and reference statistics are built here, so an unusable metric (a dataset without
    labels for the classifier, missing Inception weights) stops the run before training, not after it.
    """
    try:
        evaluator = PipelineEvaluator(
            dataset=config.dataset,
            feature=config.eval_feature,
            num_samples=config.eval_num_samples,
            num_inference_steps=config.eval_inference_steps,
            seed=config.seed,
            image_column=config.image_column,
            accelerator=accelerator,
            guidance_scale=config.guidance_scale,
        )
        evaluator.prepare(config.resolution, config.channels, accelerator.device)
    # Its argument checks, and a dataset the classifier cannot learn from, raise ValueErrors.
    except (ValueError, MissingWeightsError) as error:
        raise TrainingConfigError(
            f"--eval_feature {config.eval_feature} cannot be evaluated: {error}"
        ) from None
    return evaluator
