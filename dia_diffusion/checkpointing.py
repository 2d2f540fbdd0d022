"""What a training run leaves on disk, written so that an interruption never leaves something that looks complete.

- Checkpoints are written into a hidden staging folder and renamed to `checkpoints/checkpoint-<step>` only once
  every file is in place; a process killed during a save leaves only the staging folder, which `latest` ignores
  and the next save clears.
- Old checkpoints are renamed out of the `checkpoint-<step>` namespace before they are deleted, for the same reason.
- The final pipeline's `model_index.json` is moved in last, so the folder loads only when it is whole.
- `training_config.json` records which run an output folder holds; another run may not write into it.
"""

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINTS_DIRNAME = "checkpoints"
RUN_RECORD_FILENAME = "training_config.json"
CHECKPOINT_STEP_FILENAME = "training_step.json"
PIPELINE_INDEX_FILENAME = "model_index.json"
_CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
_STAGING_PREFIX = ".staging-"
_DISCARD_PREFIX = ".discard-"


class RunIdentityError(ValueError):
    """`--output_dir` holds something other than (a resumable state of) this run; one line for the user."""


class CheckpointNotFoundError(ValueError):
    """`--resume_from_checkpoint` names no complete checkpoint; one line for the user."""


def checkpoint_path(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"checkpoint-{step}"


def staging_path(final_path: Path) -> Path:
    """The hidden sibling a checkpoint (or pipeline) is written into before it is published under its name."""
    return final_path.with_name(_STAGING_PREFIX + final_path.name)


def prepare_staging(final_path: Path) -> Path:
    """Clears what a killed save may have left and returns the empty staging folder for `final_path`."""
    staging = staging_path(final_path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_checkpoint(staging: Path, final_path: Path, step: int) -> None:
    """Records the step inside the staged checkpoint, then renames it into place in one atomic step."""
    (staging / CHECKPOINT_STEP_FILENAME).write_text(json.dumps({"global_step": step}) + "\n")
    if final_path.exists():
        # A run resumed from an earlier checkpoint reaches this step again: swap, never leave a gap or a mix.
        discard = final_path.with_name(_DISCARD_PREFIX + final_path.name)
        shutil.rmtree(discard, ignore_errors=True)
        os.rename(final_path, discard)
        os.rename(staging, final_path)
        shutil.rmtree(discard)
    else:
        os.rename(staging, final_path)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, keep: int | None) -> Path:
    """accelerate's full training state (model, optimizer, LR schedule, registered objects such as the EMA, and
    every process's RNG states) as `checkpoints/checkpoint-<step>`, published atomically; all processes call it."""
    final_path = checkpoint_path(checkpoints_dir, step)
    staging = staging_path(final_path)
    if accelerator.is_main_process:
        prepare_staging(final_path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_checkpoint(staging, final_path, step)
        if keep is not None:
            remove_old_checkpoints(checkpoints_dir, keep)
    accelerator.wait_for_everyone()
    return final_path


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores everything `save_checkpoint` wrote and returns the optimizer step it was taken at."""
    accelerator.load_state(str(path))
    return checkpoint_step(path)


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first; staging and discarded folders are not listed."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = _CHECKPOINT_PATTERN.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_old_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` checkpoints and returns the paths it removed."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    removed = []
    for _, path in list_checkpoints(checkpoints_dir)[:-keep]:
        discard = path.with_name(_DISCARD_PREFIX + path.name)
        os.rename(path, discard)
        shutil.rmtree(discard)
        removed.append(path)
    return removed


def resolve_resume_checkpoint(checkpoints_dir: Path, spec: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None when there is none yet); a path -> that checkpoint."""
    if spec == "latest":
        return find_latest_checkpoint(checkpoints_dir)
    path = Path(spec).expanduser()
    if not (path / CHECKPOINT_STEP_FILENAME).is_file():
        reason = "does not exist" if not path.exists() else "is not a complete checkpoint folder"
        raise CheckpointNotFoundError(f"--resume_from_checkpoint '{spec}' {reason}")
    return path


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / CHECKPOINT_STEP_FILENAME).read_text())["global_step"])


def check_output_dir(
    output_dir: Path, record: dict[str, Any], neutral_keys: Iterable[str], resuming: bool
) -> None:
    """Raises RunIdentityError unless `output_dir` is new, empty, or holds this same run.

    `record` is the JSON-ready description of the run (its resolved config); keys in `neutral_keys` may differ
    between invocations of one run (e.g. how often it logs). Holding this run's checkpoints or final pipeline
    is allowed only when resuming, so a repeated command never silently starts over on top of finished work.
    """
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RunIdentityError(f"--output_dir '{output_dir}' is a file, not a folder")
    if not any(output_dir.iterdir()):
        return
    record_file = output_dir / RUN_RECORD_FILENAME
    if not record_file.is_file():
        raise RunIdentityError(
            f"--output_dir '{output_dir}' is not empty and holds no {RUN_RECORD_FILENAME}; choose a new or empty folder"
        )
    saved = json.loads(record_file.read_text())
    current = json.loads(json.dumps(record))
    neutral = set(neutral_keys)
    differences = [
        key
        for key in sorted(saved.keys() | current.keys())
        if key not in neutral and saved.get(key) != current.get(key)
    ]
    if differences:
        details = "; ".join(
            f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now" for key in differences[:3]
        )
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise RunIdentityError(
            f"--output_dir '{output_dir}' holds a different run ({details}{more}); choose another --output_dir"
        )
    holds_results = (
        list_checkpoints(output_dir / CHECKPOINTS_DIRNAME) or (output_dir / PIPELINE_INDEX_FILENAME).exists()
    )
    if holds_results and not resuming:
        raise RunIdentityError(
            f"--output_dir '{output_dir}' already holds this run's checkpoints or final pipeline; "
            "pass --resume_from_checkpoint latest to continue it, or choose another --output_dir"
        )


def write_run_record(output_dir: Path, record: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    staged = output_dir / (_STAGING_PREFIX + RUN_RECORD_FILENAME)
    staged.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(staged, output_dir / RUN_RECORD_FILENAME)


def publish_pipeline(save_pretrained: Callable[[str], None], output_dir: Path) -> None:
    """Saves a pipeline into `output_dir`, moving its `model_index.json` in last.

    Diffusers loads a folder through `model_index.json`, so until that file lands the folder holds no pipeline,
    and a previous pipeline's components are replaced one folder at a time.
    """
    staging = prepare_staging(output_dir / "pipeline")
    save_pretrained(str(staging))
    index = staging / PIPELINE_INDEX_FILENAME
    (output_dir / PIPELINE_INDEX_FILENAME).unlink(missing_ok=True)
    for entry in staging.iterdir():
        if entry == index:
            continue
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    os.replace(index, output_dir / PIPELINE_INDEX_FILENAME)
    staging.rmdir()
