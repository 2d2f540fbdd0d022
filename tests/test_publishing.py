"""A saved model says what it is: the model card beside every saved DIA model and trained pipeline, and the push of
a run's pipeline folder to the Hugging Face Hub (tested up to the network call; no network here)."""

import dataclasses
import re
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from conftest import TINY_GREY_UNET, load_script
from diffusers import DDPMPipeline, UNet2DModel
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from tiny_training import tiny_config

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.models.model_facts import count_parameters
from dia_diffusion.training import loop
from dia_diffusion.training.loop import train
from dia_diffusion.training.publishing import run_card


def fake_metric(config, accelerator):
    """An evaluator that reports a fixed FD (classifier features), so a card's metric costs no classifier."""
    return lambda pipeline: {"fd_classifier": 1.25}


def usage_code(card: ModelCard) -> str:
    return re.search(r"```python\n(.*?)```", card.text, re.S).group(1)


def test_a_trained_pipeline_folder_has_a_model_card_that_loads_and_samples_it(
    tiny_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "make_evaluator", fake_metric)
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_dataset, run_dir, eval_every=2)
    result = train(config)

    card = ModelCard.load(run_dir / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert {"diffusers", "dia", "unconditional-image-generation"} <= set(card.data.tags)
    assert card.data.base_model is None  # trained from scratch
    # The DIA options and their cost in parameters, against the stock UNet of the same layout.
    stock = count_parameters(UNet2DModel(**config.unet_arguments()))
    dia = count_parameters(result.unet)
    assert f"| parameters | {dia:,} |" in card.text and f"{stock:,}" in card.text
    assert f"{dia - stock:+,}" in card.text
    for option in ("dia_sharing", "dia_reduction", "dia_gate", "dia_condition", "dia_global_cell"):
        assert f"`{option}` | `{result.unet.config[option]!r}`" in card.text
    # The training settings, the last in-training metric named by its features (never FID), the sample grid.
    assert "| `steps trained` | `4` |" in card.text and "| `learning_rate` | `0.001` |" in card.text
    assert "**FD (classifier features)** (`fd_classifier`) = 1.25 at step 4" in card.text
    assert "FID" not in card.text.replace("not FID", "")
    assert (
        "![samples](samples/step-0000004.png)" in card.text
        and (run_dir / "samples/step-0000004.png").is_file()
    )
    # One card, at the pipeline's root; the lines it gives load and sample these weights.
    assert not (run_dir / "unet" / "README.md").exists()
    namespace: dict = {}
    exec(usage_code(card).replace("num_inference_steps=250", "num_inference_steps=2"), namespace)
    assert len(namespace["images"]) == 16 and isinstance(namespace["pipeline"].unet, DIAUNet2DModel)


def test_the_card_of_a_stock_run_says_it_is_the_stock_unet_and_claims_no_dia(tiny_dataset, tmp_path):
    config = dataclasses.replace(
        tiny_config(tiny_dataset, tmp_path / "run", unet="stock"), init_unet="google/ddpm-cifar10-32"
    )
    unet = UNet2DModel(**TINY_GREY_UNET)
    card = ModelCard.load(run_card(tmp_path, config, unet, 4, "someone/stock-cifar10"))
    assert "dia" not in card.data.tags
    assert "the stock UNet, without DIA" in card.text and "A stock diffusers `UNet2DModel`" in card.text
    assert "with Dense-and-Implicit Attention" not in card.text and "retrofitted" not in card.text
    assert f"| {count_parameters(unet):,} |" in card.text and "added by DIA" not in card.text


def test_the_card_names_the_base_model_and_the_hub_dataset(tiny_dataset, tmp_path):
    unet = DIAUNet2DModel(**TINY_GREY_UNET)
    config = dataclasses.replace(
        tiny_config(tiny_dataset, tmp_path / "run"), dataset="cifar10", init_unet="google/ddpm-cifar10-32"
    )
    card = ModelCard.load(run_card(tmp_path, config, unet, 4, "someone/dia-cifar10"))
    assert card.data.base_model == "google/ddpm-cifar10-32" and card.data.datasets == ["uoft-cs/cifar10"]
    assert 'DDPMPipeline.from_pretrained("someone/dia-cifar10")' in card.text
    assert "Evaluation" not in card.text and "![samples]" not in card.text  # nothing measured, no grid


def test_a_retrofit_saved_through_the_api_has_a_card_naming_its_base_model(tmp_path):
    stock = UNet2DModel(**TINY_GREY_UNET)
    stock.register_to_config(_name_or_path="google/ddpm-cifar10-32")  # as from_pretrained records its source
    retrofit = DIAUNet2DModel.from_unet(stock)
    retrofit.save_pretrained(tmp_path / "dia")

    card = ModelCard.load(tmp_path / "dia" / "README.md")
    assert card.data.base_model == "google/ddpm-cifar10-32" and "dia" in card.data.tags
    added = count_parameters(retrofit) - count_parameters(stock)
    assert f"| added by DIA | {added:+,} (" in card.text and "`dia_gate` | `'identity'`" in card.text
    namespace: dict = {}
    exec(usage_code(card).split("pipeline =")[0], namespace)  # loading; sampling is the pipeline's own
    loaded = namespace["unet"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), retrofit.parameters(), strict=True))


def train_script():
    return load_script("train/train_ddpm.py")


def cli_arguments(dataset: str, output_dir: Path) -> list[str]:
    return ["--dataset", dataset, "--output_dir", str(output_dir), "--train_batch_size", "4", "--max_train_steps",
            "2", "--checkpointing_steps", "1", "--num_sample_images", "4", "--sample_inference_steps", "2",
            "--report_to", "none", "--lr_warmup_steps", "0", "--eval_every", "0"]  # fmt: skip


def record_uploads(monkeypatch, repo_id: str) -> list[dict]:
    """huggingface_hub's create_repo answers `repo_id`; upload_folder records what it was asked to upload."""
    uploads = []
    created = type("RepoUrl", (), {"repo_id": repo_id})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda name, **options: created())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **upload: uploads.append(upload))
    return uploads


def test_push_to_hub_uploads_the_pipeline_and_its_card_not_the_checkpoints(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    uploads = record_uploads(monkeypatch, "someone/tiny-dia")
    run_dir = tmp_path / "run"
    argv = cli_arguments(tiny_dataset, run_dir) + ["--push_to_hub", "--hub_model_id", "tiny-dia"]
    assert train_script().main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "pushed to https://huggingface.co/someone/tiny-dia"

    (upload,) = uploads
    assert upload["repo_id"] == "someone/tiny-dia" and Path(upload["folder_path"]) == run_dir
    files = [str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()]
    uploaded = set(filter_repo_objects(files, allow_patterns=upload["allow_patterns"]))
    assert {"README.md", "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "samples/step-0000002.png"} <= uploaded  # fmt: skip
    assert not any(name.startswith("checkpoints/") or name == ".lock" for name in uploaded)
    assert any(name.startswith("checkpoints/") for name in files)
    # The card that goes up names the repository as where to load it from.
    card = ModelCard.load(run_dir / "README.md")
    assert 'DDPMPipeline.from_pretrained("someone/tiny-dia")' in card.text
    assert DDPMPipeline.from_pretrained(run_dir).unet.config.sample_size == 8


def test_a_push_without_network_keeps_everything_saved_and_ends_in_one_line(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    run_dir = tmp_path / "run"
    assert train_script().main(cli_arguments(tiny_dataset, run_dir) + ["--push_to_hub"]) == 1
    error = capsys.readouterr().err.strip().splitlines()  # the progress bar's lines, then one line
    assert [line for line in error if "push" in line] == error[-1:]
    assert error[-1].startswith("train_ddpm.py: error: the push to the hub repository 'run' failed")
    assert "offline mode" in error[-1] and error[-1].endswith(
        f"the pipeline and its card are saved in '{run_dir}'"
    )
    assert (run_dir / "README.md").is_file() and (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert f'DDPMPipeline.from_pretrained("{run_dir}")' in ModelCard.load(run_dir / "README.md").text
    assert DDPMPipeline.from_pretrained(run_dir).unet.config.sample_size == 8
    # Once the hub can be reached, the same command resumed at its last step pushes what it saved.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    uploads = record_uploads(monkeypatch, "someone/run")
    argv = [*cli_arguments(tiny_dataset, run_dir), "--push_to_hub", "--resume_from_checkpoint", "latest"]
    assert train_script().main(argv) == 0
    assert [upload["repo_id"] for upload in uploads] == ["someone/run"]


def test_hub_flags_without_push_to_hub_are_refused(tiny_dataset, tmp_path, capsys):
    argv = cli_arguments(tiny_dataset, tmp_path / "run") + ["--hub_model_id", "someone/x"]
    assert train_script().main(argv) == 2
    assert "--hub_model_id applies only with --push_to_hub" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--report_to", "--logger"])  # --logger: the flag --report_to replaced
def test_an_unknown_tracker_is_refused(tiny_dataset, tmp_path, capsys, flag):
    assert train_script().main([*cli_arguments(tiny_dataset, tmp_path / "run"), flag, "comet"]) == 2
    assert "--report_to must be one of tensorboard, wandb, all, none, got 'comet'" in capsys.readouterr().err
