"""`--init_unet`: a run that starts from a saved UNet — retrofit parity at step 0, the layout taken from the checkpoint,
refusals in one line, the run record, hub names, and bitwise-exact resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import TINY_GREY_UNET, load_script
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.data.image_datasets import load_image_dataset
from dia_diffusion.runtime.file_digests import file_sha256
from dia_diffusion.training import ema as training_ema
from dia_diffusion.training import initial_weights
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.checkpointing import RunIdentityError
from dia_diffusion.training.config import resolve_config
from dia_diffusion.training.initial_weights import InitialUNetError, load_initial_unet
from dia_diffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("isolated_run")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "digits16"
    load_image_dataset("digits").select(range(16)).save_to_disk(str(folder))
    return str(folder)


def save_pipeline(unet: UNet2DModel, folder: Path) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_pipeline(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_pipeline(UNet2DModel(**TINY_GREY_UNET), tmp_path_factory.mktemp("stock") / "pipeline")


def run_config(dataset: str, output_dir: Path, **overrides):
    settings = {
        "dataset": dataset,
        "output_dir": str(output_dir),
        "max_train_steps": 2,
        "train_batch_size": 4,
        "checkpointing_steps": 1,
        "report_to": "none",
        "num_sample_images": 2,
        "sample_inference_steps": 2,
        "eval_every": 0,
        "num_train_timesteps": 100,
        **overrides,
    }
    return resolve_config("demo", settings)


def test_retrofit_starts_from_exactly_what_the_checkpoint_computes(
    stock_pipeline, tiny_dataset, tmp_path, monkeypatch
):
    stock = UNet2DModel.from_pretrained(stock_pipeline / "unet").eval()
    sample, timesteps = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 99])
    first_outputs, initial_ema = [], []

    real_loss = training_steps.diffusion_loss

    def records_the_first_forward(unet, noise_scheduler, clean_images):
        if not first_outputs:
            unet.eval()
            with torch.no_grad():
                first_outputs.append(unet(sample, timesteps).sample)
            unet.train()
        return real_loss(unet, noise_scheduler, clean_images)

    class RecordedEMA(training_ema.EMAModel):
        def __init__(self, parameters, **kwargs):
            super().__init__(parameters, **kwargs)
            initial_ema.append([shadow.clone() for shadow in self.shadow_params])

    monkeypatch.setattr(training_steps, "diffusion_loss", records_the_first_forward)
    monkeypatch.setattr(training_ema, "EMAModel", RecordedEMA)
    config = run_config(tiny_dataset, tmp_path / "run", init_unet=str(stock_pipeline), unet="dia")
    result = train(config)

    assert config.dia_gate == "identity"
    with torch.no_grad():
        assert torch.equal(first_outputs[0], stock(sample, timesteps).sample)
    # The EMA starts from the checkpoint's weights (and the DIA module's fresh ones), not from a random UNet.
    stock_weights = stock.state_dict()
    names = [name for name, _ in result.unet.named_parameters()]
    for name, shadow in zip(names, initial_ema[0], strict=True):
        if name in stock_weights:
            assert torch.equal(shadow, stock_weights[name]), name
    assert isinstance(result.unet, DIAUNet2DModel) and result.global_step == 2
    record = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert record["init_unet"] == str(stock_pipeline)
    assert record["init_unet_sha256"] == file_sha256(
        stock_pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    )


def test_the_layout_comes_from_the_checkpoint(stock_pipeline, tmp_path):
    config = run_config(
        "digits", tmp_path / "run", init_unet=str(stock_pipeline / "unet"), unet="se-per-layer"
    )
    # The demo preset's layout (widths 32/64, attention) is replaced by the checkpoint's.
    assert list(config.unet_config["block_out_channels"]) == [8, 16]
    assert list(config.unet_config["down_block_types"]) == ["DownBlock2D", "DownBlock2D"]
    assert (config.resolution, config.channels) == (8, 1)
    assert config.unet_config["norm_num_groups"] == 4
    unet = load_initial_unet(config.init_unet, config.unet, config.dia_options())
    assert unet.config.dia_attention == "se_per_layer" and list(unet.config.block_out_channels) == [8, 16]
    # The identity gate is only the retrofit's default: options given explicitly shape the retrofitted model.
    chosen = run_config(
        "digits", tmp_path / "chosen", init_unet=str(stock_pipeline), unet="dia", dia_sharing="per_width",
        dia_gate="sigmoid",
    )  # fmt: skip
    retrofitted = load_initial_unet(chosen.init_unet, chosen.unet, chosen.dia_options())
    assert (retrofitted.config.dia_sharing, retrofitted.config.dia_gate) == ("per_width", "sigmoid")


def test_a_dia_checkpoint_loads_as_it_is(tmp_path):
    torch.manual_seed(0)
    saved = DIAUNet2DModel(**TINY_GREY_UNET, dia_sharing="per_width", dia_reduction=2).eval()
    folder = save_pipeline(saved, tmp_path / "dia")
    config = run_config("digits", tmp_path / "run", init_unet=str(folder))
    assert (config.unet, config.dia_sharing, config.dia_reduction) == ("dia", "per_width", 2)
    # A DIA checkpoint keeps its own gate: the retrofit's identity default does not apply to it.
    assert config.dia_gate == saved.config.dia_gate == "sigmoid"
    loaded = load_initial_unet(config.init_unet, config.unet, config.dia_options())
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_weights_that_cannot_be_loaded_are_refused_with_the_reason(stock_pipeline, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(stock_pipeline / "unet", folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    for unet in ("stock", "dia"):
        config = run_config("digits", tmp_path / unet, init_unet=str(folder), unet=unet)
        with pytest.raises(InitialUNetError) as raised:
            load_initial_unet(config.init_unet, config.unet, config.dia_options())
        # One line that names the source and says why, in the loader's own words.
        message = str(raised.value)
        assert message.startswith(f"--init_unet '{folder}' cannot be loaded: Unable to load weights"), message
        assert "\n" not in message


def refusal(settings: dict, match: str) -> None:
    with pytest.raises(InitialUNetError, match=match) as raised:
        resolve_config("demo", {"output_dir": "unused", **settings})
    assert "\n" not in str(raised.value)


def test_settings_that_contradict_the_checkpoint_are_refused_by_name(stock_pipeline, tmp_path):
    stock = str(stock_pipeline)
    refusal(
        {"init_unet": stock, "resolution": 16},
        r"--resolution 16 contradicts .*resolution 8; leave --resolution out",
    )
    refusal({"init_unet": stock, "channels": 3}, r"--channels 3 contradicts")
    refusal(
        {"init_unet": stock, "unet_config": {"block_out_channels": (32, 64)}}, r"--unet_config .* contradicts"
    )
    dia = str(save_pipeline(DIAUNet2DModel(**TINY_GREY_UNET), tmp_path / "dia"))
    refusal({"init_unet": dia, "unet": "stock"}, r"--unet stock cannot start from .*pass --unet dia")
    refusal({"init_unet": dia, "unet": "se-per-layer"}, r"--unet se-per-layer cannot start from")
    refusal(
        {"init_unet": dia, "dia_sharing": "per_block"}, r"--dia_sharing 'per_block' contradicts .*'global'"
    )
    refusal(
        {"init_unet": str(tmp_path / "missing" / "folder")}, r"not a local folder, and the Hugging Face hub"
    )
    (tmp_path / "empty").mkdir()
    refusal({"init_unet": str(tmp_path / "empty")}, r"holds no UNet")


def test_a_hub_name_is_downloaded_or_refused_in_one_line(stock_pipeline, tmp_path, monkeypatch):
    # No network attempt: the hub client answers from its (empty) cache only.
    monkeypatch.setattr(initial_weights.huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refusal(
        {"init_unet": "someone/no-such-ddpm"}, r"'someone/no-such-ddpm' is not a local folder, and the .*hub"
    )

    requested = []

    def snapshot_download(name, allow_patterns):
        requested.append(allow_patterns)
        return str(stock_pipeline)

    monkeypatch.setattr(initial_weights.huggingface_hub, "snapshot_download", snapshot_download)
    config = run_config("digits", tmp_path / "run", init_unet="someone/a-ddpm", unet="stock")
    assert list(config.unet_config["block_out_channels"]) == [8, 16]
    # Configs first, then only the UNet's safetensors weights.
    assert requested[-1][-1] == "unet/*.safetensors" and not any("*.bin" in p for p in requested[-1])


def test_the_script_refuses_a_dia_checkpoint_for_a_stock_run_in_one_line(tmp_path, capsys):
    dia = save_pipeline(DIAUNet2DModel(**TINY_GREY_UNET), tmp_path / "dia")
    output_dir = tmp_path / "run"
    code = load_script("train/train_ddpm.py").main(
        ["--output_dir", str(output_dir), "--init_unet", str(dia), "--unet", "stock"]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and "--unet stock cannot start from" in stderr
    assert not output_dir.exists()


def test_resume_of_a_retrofit_run_is_bitwise_exact_and_checks_the_source(
    stock_pipeline, tiny_dataset, tmp_path, monkeypatch
):
    source = tmp_path / "source"
    shutil.copytree(stock_pipeline, source)
    settings = {"init_unet": str(source), "unet": "dia", "max_train_steps": 4, "checkpointing_steps": 2}
    whole = train(run_config(tiny_dataset, tmp_path / "whole", **settings))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    # Stopped after the checkpoint at step 2 (max_train_steps may change between invocations of one run).
    train(run_config(tiny_dataset, tmp_path / "split", **{**settings, "max_train_steps": 2}))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = train(run_config(tiny_dataset, tmp_path / "split", resume_from_checkpoint="latest", **settings))

    for (name, expected), actual in zip(
        whole.unet.named_parameters(), resumed.unet.parameters(), strict=True
    ):
        assert torch.equal(expected, actual), name
    for expected, actual in zip(whole.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(expected, actual)

    # The source's weights changed since the run started: resuming it is refused, naming their sha256.
    torch.manual_seed(1)
    UNet2DModel(**TINY_GREY_UNET).save_pretrained(source / "unet")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(RunIdentityError, match="init_unet_sha256"):
        train(run_config(tiny_dataset, tmp_path / "split", resume_from_checkpoint="latest", **settings))


def test_every_start_trains_with_dropout_and_a_continuation_pairs_with_its_retrofit(
    tiny_dataset, tmp_path, monkeypatch
):
    # from_pretrained returns a model in eval mode; a run from it must still train with dropout from its first step,
    # or a stock continuation would draw no dropout noise while its paired retrofit does.
    torch.manual_seed(0)
    stock = save_pipeline(UNet2DModel(**TINY_GREY_UNET, dropout=0.5), tmp_path / "stock-pipeline")
    dia = save_pipeline(DIAUNet2DModel(**TINY_GREY_UNET, dropout=0.5).eval(), tmp_path / "dia-pipeline")
    steps = []
    real_loss = training_steps.diffusion_loss

    def records_each_step(unet, noise_scheduler, clean_images):
        loss = real_loss(unet, noise_scheduler, clean_images)
        steps.append((all(m.training for m in unet.modules()), loss.item()))
        return loss

    monkeypatch.setattr(training_steps, "diffusion_loss", records_each_step)
    starts = (("stock", stock, "stock"), ("retrofit", stock, "dia"), ("dia", dia, "dia"))
    for name, source, unet in starts:
        train(run_config(tiny_dataset, tmp_path / name, init_unet=str(source), unet=unet, max_train_steps=1))
    # One step per run.
    first_steps = dict(zip([name for name, _, _ in starts], steps, strict=True))

    assert all(in_training_mode for in_training_mode, _ in first_steps.values()), first_steps
    # Same batch, noise, timesteps and dropout masks, and the identity gate: the same loss to the last bit.
    assert first_steps["stock"][1] == first_steps["retrofit"][1]
