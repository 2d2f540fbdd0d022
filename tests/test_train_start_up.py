"""A training start that fails leaves its --output_dir as it found it: after a full disk at start-up the error names
the file, and once space is freed the same command runs."""

import errno
import pathlib

import pytest
from conftest import load_script
from test_train_cli import run_script, tiny_run_flags

pytestmark = pytest.mark.usefixtures("isolated_run")


def test_a_full_disk_at_start_up_names_the_file_and_the_same_command_runs_after(
    capsys, tiny_dataset, tmp_path, monkeypatch
):
    script = load_script("train/train_ddpm.py")
    run_dir = tmp_path / "run"
    real_write_text = pathlib.Path.write_text

    def disk_full_for_the_run_record(self, *args, **kwargs):
        if "training_config.json" in self.name:
            real_write_text(self, "")  # what a full disk leaves: the file, empty
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", disk_full_for_the_run_record)
        code, stderr = run_script(script, capsys, run_dir, *tiny_run_flags(tiny_dataset))
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [
        f"train_ddpm.py: error: '{run_dir / 'training_config.json'}' could not be written: No space left on "
        "device (the disk is full: free space, then run the command again)"
    ]
    assert [path.name for path in run_dir.iterdir()] == [".lock"]

    code, stderr = run_script(script, capsys, run_dir, *tiny_run_flags(tiny_dataset))
    assert code == 0, stderr
    assert (run_dir / "model_index.json").is_file()
