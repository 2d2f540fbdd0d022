"""What a training run leaves on disk, written so that an interruption never leaves something that looks complete.

- Checkpoints are written into a hidden staging folder and renamed to `checkpoints/checkpoint-<step>` only once
  every file is in place; a process killed during a save leaves only the staging folder, which `latest` ignores
  and the next save clears.
- Old checkpoints are renamed out of the `checkpoint-<step>` namespace before they are deleted, for the same reason.
- The final pipeline's `model_index.json` is moved in last, so the folder loads only when it is whole.
- `training_config.json` records which run an output folder holds; another run may not write into it. Each
  checkpoint carries a copy as of its step, so a checkpoint names its run wherever it is copied.
- Publishing runs inside `deferred_interruption()`: a stop signal waits until the folder is complete.
- `--resume_from_checkpoint latest` falls back to the newest checkpoint that loads, saying which one failed.
"""

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME

from dia_diffusion.runtime.folder_lock import LOCK_FILENAME, FolderLock, check_unlocked, lock_folder
from dia_diffusion.runtime.interruption import deferred_interruption
from dia_diffusion.runtime.output_files import (
    OutputWriteError,
    move_into,
    prepare_staging,
    replace_folder,
    staging_path,
    write_atomically,
)

CHECKPOINTS_DIRNAME = "checkpoints"
RUN_RECORD_FILENAME = "training_config.json"
CHECKPOINT_STEP_FILENAME = "training_step.json"
PIPELINE_INDEX_FILENAME = "model_index.json"
_CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
_DISCARD_PREFIX = ".discard-"


class RunIdentityError(ValueError):
    """`--output_dir` holds something other than (a resumable state of) this run; one line for the user."""


class CheckpointNotFoundError(ValueError):
    """`--resume_from_checkpoint` names no complete checkpoint; one line for the user."""


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be loaded (corrupt, or written by another model); one line naming it."""


def checkpoint_path(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"checkpoint-{step}"


def publish_checkpoint(
    staging: Path,
    final_path: Path,
    step: int,
    record: dict[str, Any] | None = None,
    metrics_window: dict[str, float] | None = None,
) -> None:
    """Records the step (the run record, and the metrics window open at that step) inside the staged checkpoint,
    then renames it into place in one atomic step."""
    if record is not None:
        write_run_record(staging, record)
    position = {"global_step": step, **({"metrics_window": metrics_window} if metrics_window else {})}
    (staging / CHECKPOINT_STEP_FILENAME).write_text(json.dumps(position) + "\n")
    # A run resumed from an earlier checkpoint reaches this step again: swap, never leave a gap or a mix.
    replace_folder(staging, final_path)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: Path,
    step: int,
    keep: int | None,
    record: dict[str, Any] | None = None,
    metrics_window: dict[str, float] | None = None,
) -> Path:
    """accelerate's full training state (model, optimizer, LR schedule, registered objects such as the EMA, and
    every process's RNG states) as `checkpoints/checkpoint-<step>`, published atomically; all processes call it.
    `metrics_window` is the main process's open `metrics.jsonl` window, which a resumed run continues."""
    final_path = checkpoint_path(checkpoints_dir, step)
    staging = staging_path(final_path)
    with deferred_interruption():
        if accelerator.is_main_process:
            prepare_staging(final_path)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
        # torch and safetensors report a failed write with their own error types, not only OSError.
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputWriteError(
                f"checkpoint '{final_path}' could not be written: {one_line(error)}"
            ) from None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_checkpoint(staging, final_path, step, record, metrics_window)
            if keep is not None:
                remove_old_checkpoints(checkpoints_dir, keep)
        accelerator.wait_for_everyone()
    return final_path


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores everything `save_checkpoint` wrote and returns the optimizer step it was taken at.

    Raises CheckpointLoadError on every process when any process cannot load its part (a truncated file, another
    model's weights), so that all of them go on with the same checkpoint or none.
    """
    try:
        # accelerate skips RNG states it cannot read with no more than an info log; an exact resume needs them.
        torch.load(path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl", weights_only=False)
        accelerator.load_state(str(path))
        step, reason = checkpoint_step(path), ""
    # safetensors, pickle, torch and shape errors alike: the checkpoint is unusable.
    except Exception as error:
        step, reason = -1, one_line(error)
    failed = accelerator.gather(torch.tensor([step < 0], device=accelerator.device))
    if failed.any():
        where = reason or f"on process {int(failed.nonzero()[0])}"
        raise CheckpointLoadError(f"checkpoint '{path}' cannot be loaded: {where}")
    return step


def one_line(error: Exception) -> str:
    """The gist of a library error in one line: its first line, and the next one when the first only introduces
    it (torch's "Error(s) in loading state_dict for X:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def load_resume_checkpoint(
    accelerator: Accelerator, checkpoints_dir: Path, spec: str, notice: Callable[[str], None]
) -> Path | None:
    """Loads what `--resume_from_checkpoint` names and returns it; None when `latest` finds no checkpoint yet.

    `latest` tries the complete checkpoints newest first and reports (through `notice`) each one that cannot be
    loaded; a named checkpoint that cannot be loaded is refused. Nothing usable at all raises CheckpointLoadError.
    """
    if spec != "latest":
        path = resolve_resume_checkpoint(checkpoints_dir, spec)
        load_checkpoint(accelerator, path)
        return path
    candidates = [path for _, path in reversed(list_checkpoints(checkpoints_dir))]
    if not candidates:
        notice(
            f"--resume_from_checkpoint latest: '{checkpoints_dir}' holds no checkpoint yet; starting at step 0"
        )
        return None
    # Each attempt either returns or, for the oldest, raises: the loop never falls through.
    for path, older in zip(candidates, [*candidates[1:], None]):
        try:
            load_checkpoint(accelerator, path)
            return path
        except CheckpointLoadError as error:
            if older is None:
                raise CheckpointLoadError(
                    f"{error}; no checkpoint in '{checkpoints_dir}' can be loaded"
                ) from None
            notice(f"{error}; falling back to '{older}'")


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


def checkpoint_metrics_window(path: Path) -> dict[str, float] | None:
    """The metrics window open at the checkpoint's step (None for a checkpoint saved at a row, or before the window
    was saved)."""
    return json.loads((path / CHECKPOINT_STEP_FILENAME).read_text()).get("metrics_window")


def check_output_dir(
    output_dir: Path, record: dict[str, Any], neutral_keys: Iterable[str], resuming: bool
) -> None:
    """Raises RunIdentityError unless `output_dir` is new, empty, or holds this same run.

    `record` is the JSON-ready description of the run (its resolved config); keys in `neutral_keys` may differ
    between invocations of one run (e.g. how often it logs). Holding this run's checkpoints or final pipeline
    is allowed only when resuming, so a repeated command never silently starts over on top of finished work.
    A folder that another training holds now is refused too (FolderInUseError), before anything is loaded.
    """
    check_unlocked(output_dir / LOCK_FILENAME, "--output_dir", output_dir, "training")
    check_run_folder(output_dir, record, neutral_keys, resuming)


def check_run_folder(
    output_dir: Path, record: dict[str, Any], neutral_keys: Iterable[str], resuming: bool
) -> None:
    """`check_output_dir` without the lock probe: what the folder holds."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RunIdentityError(f"--output_dir '{output_dir}' is a file, not a folder")
    # The lock file of a start that stopped before writing anything does not make a folder used.
    if all(entry.name == LOCK_FILENAME for entry in output_dir.iterdir()):
        return
    saved = read_run_record(output_dir)
    if saved is None:
        raise RunIdentityError(
            f"--output_dir '{output_dir}' is not empty and holds no {RUN_RECORD_FILENAME}; choose a new or empty folder"
        )
    differences = describe_differences(saved, record, neutral_keys)
    if differences:
        raise RunIdentityError(
            f"--output_dir '{output_dir}' holds a different run ({differences}); choose another --output_dir"
        )
    holds_results = (
        list_checkpoints(output_dir / CHECKPOINTS_DIRNAME) or (output_dir / PIPELINE_INDEX_FILENAME).exists()
    )
    if holds_results and not resuming:
        raise RunIdentityError(
            f"--output_dir '{output_dir}' already holds this run's checkpoints or final pipeline; "
            "pass --resume_from_checkpoint latest to continue it, or choose another --output_dir"
        )


def claim_output_dir(
    output_dir: Path, record: dict[str, Any], neutral_keys: Iterable[str], resuming: bool
) -> FolderLock:
    """Locks `output_dir` for this training (FolderInUseError while another holds it), then repeats
    `check_run_folder` under the lock: a training that ended meanwhile may have filled the folder."""
    folder_lock = lock_folder(output_dir)
    try:
        check_run_folder(output_dir, record, neutral_keys, resuming)
    except RunIdentityError:
        folder_lock.release()
        raise
    return folder_lock


def check_resume_checkpoint(
    checkpoints_dir: Path, spec: str, record: dict[str, Any], neutral_keys: Iterable[str]
) -> None:
    """Before anything is loaded: a checkpoint named by path must be a complete checkpoint of the run `record`
    describes (CheckpointNotFoundError, RunIdentityError). `latest` comes from the output folder, which
    `check_output_dir` checks.

    The checkpoint's own copy of the run record decides; a checkpoint without one is judged by the record of the run
    folder it sits in, if any.
    """
    if spec == "latest":
        return
    path = resolve_resume_checkpoint(checkpoints_dir, spec)
    saved = read_run_record(path)
    if saved is None:
        saved = read_run_record(path.parent.parent)
    differences = describe_differences(saved, record, neutral_keys) if saved is not None else ""
    if differences:
        raise RunIdentityError(
            f"--resume_from_checkpoint '{path}' belongs to a different run ({differences}); resume it with its own "
            "settings, or start a new run"
        )


def describe_differences(saved: dict[str, Any], record: dict[str, Any], neutral_keys: Iterable[str]) -> str:
    """The first three settings (other than `neutral_keys`) in which two run records differ, as one phrase; empty
    when they describe the same run."""
    current = json.loads(json.dumps(record))  # tuples compare as the lists JSON gives back
    neutral = set(neutral_keys)
    differences = [
        key
        for key in sorted(saved.keys() | current.keys())
        if key not in neutral and saved.get(key) != current.get(key)
    ]
    details = "; ".join(
        f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now" for key in differences[:3]
    )
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    return details + more


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The run record in `folder` (a run folder or a checkpoint), or None when it has none."""
    record_file = folder / RUN_RECORD_FILENAME
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunIdentityError(f"'{record_file}' is not a readable run record: {error}") from None
    if not isinstance(record, dict):
        raise RunIdentityError(f"'{record_file}' is not a run record (a JSON object)")
    return record


def write_run_record(output_dir: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomically(output_dir / RUN_RECORD_FILENAME, lambda partial: partial.write_text(text))


def publish_pipeline(save_pretrained: Callable[[str], None], output_dir: Path) -> None:
    """Saves a pipeline into `output_dir`, moving its `model_index.json` in last.

    Diffusers loads a folder through `model_index.json`, so until that file lands the folder holds no pipeline,
    and a previous pipeline's components are replaced one folder at a time.
    """
    with deferred_interruption():
        staging = prepare_staging(output_dir / "pipeline")
        try:
            save_pretrained(str(staging))
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputWriteError(
                f"the pipeline could not be written into '{output_dir}': {one_line(error)}"
            ) from None
        move_into(staging, output_dir, last=PIPELINE_INDEX_FILENAME)
