"""--report_to: the trackers get every metrics.jsonl row with the same names and steps, and the run's settings with
the DIA options; W&B is run for real in offline mode and its run file read back with wandb's own reader."""

import json
import subprocess
import sys

import pytest
from tiny_training import read_metrics, tiny_config

from dia_diffusion.training.checkpointing import describe_differences
from dia_diffusion.training.config import RUN_NEUTRAL_FIELDS, run_record
from dia_diffusion.training.loop import train


def wandb_records(wandb_dir) -> list[dict]:
    """The records of the one offline run under `wandb_dir`, as `wandb leet inspect --json` prints them."""
    (run_folder,) = (wandb_dir / "wandb").glob("offline-run-*")
    inspect = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    return [json.loads(line) for line in inspect.stdout.splitlines() if line.startswith("{")]


def test_report_to_wandb_offline_logs_what_metrics_jsonl_holds(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'dia-diffusion[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_dataset, run_dir, report_to="wandb", dia_sharing="per_width"))

    records = wandb_records(tmp_path)
    history = {record["history"]["step"]["num"]: record["history"]["item"] for record in records if record["type"] == "history"}  # fmt: skip
    rows = read_metrics(run_dir)
    assert sorted(history) == [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        # The same names and values: JSON carries the floats exactly both ways.
        assert {key: history[row["step"]][key] for key in row if key != "step"} == {
            key: value for key, value in row.items() if key != "step"
        }
    config = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    assert config["dia_sharing"] == "per_width" and config["dia_attention"] == "dia_lstm"
    assert config["dia_hidden_channels"] == "default" and config["max_train_steps"] == 4
    assert [r["run"]["display_name"] for r in records if r["type"] == "run"] == ["run"]
    assert not list(run_dir.rglob("events.out.tfevents*"))  # only the tracker asked for


def test_a_run_recorded_with_the_old_logger_setting_resumes_with_report_to(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run", report_to="wandb", push_to_hub=True)
    old = {
        key: value for key, value in run_record(config, 1).items() if key not in ("report_to", "push_to_hub")
    }
    old = json.loads(json.dumps({**old, "logger": "none", "hub_private": False}))
    assert describe_differences(old, run_record(config, 1), RUN_NEUTRAL_FIELDS) == ""
