"""Pushing a saved model folder to the Hugging Face Hub, with huggingface_hub's own `create_repo` and `upload_folder`
(as diffusers' example trainers do), and loading one back through the hub cache.

Credentials are huggingface_hub's: `hf auth login` or `HF_TOKEN`. A push that cannot reach the hub, or is refused
by it, raises `HubPushError` with one line; what was saved locally stays as it is.
"""

from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import validate_repo_id

from dia_diffusion.runtime.errors import first_line


class HubPushError(RuntimeError):
    """The push to the hub failed; the message is one line naming the repository and the reason."""


class HubLoadError(ValueError):
    """A hub name that neither the hub nor the hub cache can provide; one line for the user."""


def hub_repo_id(folder: str | Path, hub_model_id: str | None) -> str:
    """The repository a folder is pushed to: `--hub_model_id`, else the folder's name (diffusers' default)."""
    return hub_model_id or Path(folder).resolve().name


def is_hub_name(name: str | None) -> bool:
    """Whether `name` reads as a hub repository id rather than a local path."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def create_hub_repo(repo_id: str, private: bool) -> str:
    """Creates `repo_id` where it does not exist yet; returns its full id (with the namespace the hub gave it)."""
    try:
        return huggingface_hub.create_repo(repo_id, exist_ok=True, private=private).repo_id
    # huggingface_hub reports an unreachable hub, offline mode, a refused token and a bad name with several error
    # types (OSError, ValueError and their subclasses, HTTP errors); each ends the push the same way.
    except Exception as error:
        raise HubPushError(
            f"the push to the hub repository '{repo_id}' failed: {first_line(error)}"
        ) from None


def upload_to_hub(folder: str | Path, repo_id: str, allow_patterns: list[str], commit_message: str) -> None:
    """Uploads the files of `folder` that `allow_patterns` select, in one commit."""
    try:
        huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=allow_patterns,
            commit_message=commit_message,
        )
    except Exception as error:  # as in create_hub_repo
        raise HubPushError(
            f"the push to the hub repository '{repo_id}' failed: {first_line(error)}"
        ) from None


def push_folder(
    folder: str | Path, repo_id: str, private: bool, allow_patterns: list[str], message: str
) -> str:
    """`create_hub_repo` then `upload_to_hub`; returns the repository's full id."""
    full_id = create_hub_repo(repo_id, private)
    upload_to_hub(folder, full_id, allow_patterns, message)
    return full_id


def local_or_hub_folder(model: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """`model` itself when it is a local folder; else a hub name, fetched into the hub cache, or read from the cache
    alone when the hub cannot be reached (or `HF_HUB_OFFLINE=1`)."""
    path = Path(model).expanduser()
    if not is_hub_name(str(model)):
        return path
    try:
        return Path(huggingface_hub.snapshot_download(str(model), allow_patterns=allow_patterns))
    except Exception as error:  # an unreachable hub: the cache may still hold the snapshot
        reason = first_line(error)
    try:
        return Path(
            huggingface_hub.snapshot_download(
                str(model), allow_patterns=allow_patterns, local_files_only=True
            )
        )
    except Exception:
        raise HubLoadError(
            f"--model '{model}' is not a local folder, and neither the Hugging Face hub nor its cache can provide "
            f"it: {reason}"
        ) from None
