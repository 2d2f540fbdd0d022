"""The attention-correlation analysis: the statistic itself, the recording, and the command end to end."""

import errno
import json

import numpy as np
import pytest
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.cli import main as cli_main
from dia_diffusion.commands.params import preset_unet_config
from dia_diffusion.evaluation import correlation
from dia_diffusion.evaluation.correlation import (
    aligned_pairs,
    input_variation,
    layer_correlation,
    mean_off_diagonal,
    profile_correlation,
    record_attention,
    residual_streams,
    timestep_variation,
)


def test_layer_correlation_is_the_mean_per_input_pearson_r():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(20, 8, generator=generator), torch.rand(20, 8, generator=generator)
    c = torch.rand(20, 4, generator=generator)
    matrix = layer_correlation([a, b, 3 * a + 1, c])
    expected_ab = np.mean([np.corrcoef(a[n].numpy(), b[n].numpy())[0, 1] for n in range(20)])
    assert np.isclose(matrix[0, 1], expected_ab, atol=1e-10)
    assert np.isclose(matrix[0, 2], 1.0) and np.allclose(np.diag(matrix), 1.0)
    assert np.isnan(matrix[0, 3]) and np.isnan(matrix[3, 1])  # different widths
    assert np.isclose(
        mean_off_diagonal(matrix), np.nanmean([matrix[i, j] for i in range(4) for j in range(4) if i != j])
    )


def test_profile_correlation_is_the_pearson_r_of_the_mean_attention_vectors():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 5, 8, generator=generator), torch.rand(3, 5, 8, generator=generator)
    matrix = profile_correlation([a, b])
    profile_a, profile_b = a.reshape(-1, 8).mean(dim=0), b.reshape(-1, 8).mean(dim=0)
    assert np.isclose(matrix[0, 1], np.corrcoef(profile_a.numpy(), profile_b.numpy())[0, 1], atol=1e-10)
    # Per-input correlation and profile correlation are different statistics.
    assert not np.isclose(matrix[0, 1], layer_correlation([a, b])[0, 1])


def test_input_and_timestep_variation_separate_what_the_attention_follows():
    generator = torch.Generator().manual_seed(1)
    # [timesteps, images, channels]: one varies only with the image, one only with the timestep, one with neither.
    by_image = torch.rand(1, 10, 6, generator=generator).expand(4, 10, 6)
    by_timestep = torch.rand(4, 1, 6, generator=generator).expand(4, 10, 6)
    constant = torch.rand(1, 1, 6, generator=generator).expand(4, 10, 6)
    inputs, timesteps = (
        input_variation([by_image, by_timestep, constant]),
        timestep_variation([by_image, by_timestep, constant]),
    )
    assert inputs[0] == pytest.approx(by_image[0].double().std(dim=0).mean().item(), rel=1e-12)
    assert timesteps[1] == pytest.approx(by_timestep[:, 0].double().std(dim=0).mean().item(), rel=1e-12)
    assert inputs[0] > 0.1 and timesteps[1] > 0.1
    assert [inputs[1], timesteps[0], inputs[2], timesteps[2]] == pytest.approx([0.0] * 4, abs=1e-12)


def test_residual_streams_follow_where_channels_are_re_mixed():
    with torch.device("meta"):
        unet = DIAUNet2DModel(**preset_unet_config("cifar10-ddpm"))
    streams = residual_streams(unet)
    # Four down levels of 2 resnets, separated by strided convolutions; the mid block continues the last level's
    # stream; every up resnet re-mixes the concatenated skip with its 1x1 shortcut.
    assert streams == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, *range(4, 16)]
    assert len(aligned_pairs(streams)) == 3 + 6
    assert aligned_pairs([0, 0, 1, 2, 2, 2]) == [(0, 1), (3, 4), (3, 5), (4, 5)]


def test_resnet_down_and_upsamplers_keep_their_stream():
    with torch.device("meta"):
        unet = DIAUNet2DModel(
            **{**TINY_GREY_UNET, "down_block_types": ("ResnetDownsampleBlock2D", "DownBlock2D")},
            downsample_type="resnet",
        )
    # Level 0: resnet + resnet downsampler (pooling shortcut, no channel mixing); level 1 after it keeps... a new
    # stream only because its first resnet widens 8 -> 16 through a 1x1 shortcut.
    streams = residual_streams(unet)
    assert streams[:2] == [0, 0] and streams[2] == 1 and streams[3:5] == [1, 1]


def tiny_model(attention: str) -> DIAUNet2DModel:
    torch.manual_seed(0)
    return DIAUNet2DModel(**TINY_GREY_UNET, dia_attention=attention).eval()


def test_recording_sees_every_site_and_leaves_the_model_unchanged():
    model = tiny_model("se_per_layer")
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        before = model(images, torch.tensor([10, 10, 10])).sample
    vectors = record_attention(model, images, [10, 500], DDPMScheduler())
    assert len(vectors) == len(model.resnet_sites)
    assert [v.shape for v in vectors] == [(2, 3, site.channels) for site in model.resnet_sites]
    assert all(((v > 0) & (v < 1)).all() for v in vectors)
    assert "attention" not in vars(model.channel_attention)
    with torch.no_grad():
        assert torch.equal(model(images, torch.tensor([10, 10, 10])).sample, before)


def test_analyze_correlation_command_writes_json_and_heatmap(tmp_path):
    DDPMPipeline(unet=tiny_model("dia_lstm"), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    code = cli_main(
        [
            "analyze-correlation",
            "--model",
            str(tmp_path / "pipe"),
            "--dataset",
            "digits",
            "--num_images",
            "8",
            "--timesteps",
            "100",
            "600",
            "--out_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "correlation.json").read_text())
    assert report["num_images"] == 8 and report["dia_attention"] == "dia_lstm"
    assert (
        len(report["correlation"]) == len(report["site_widths"]) == len(tiny_model("dia_lstm").resnet_sites)
    )
    assert -1 <= report["mean_r_aligned_pairs"] <= 1 and -1 <= report["mean_r_profiles"] <= 1
    matrix = np.array([[np.nan if v is None else v for v in row] for row in report["correlation"]])
    assert report["mean_r_all_pairs"] == pytest.approx(mean_off_diagonal(matrix), abs=1e-5)
    assert report["residual_streams"] == residual_streams(tiny_model("dia_lstm"))
    assert len(report["input_variation"]) == len(report["timestep_variation"]) == len(report["site_widths"])
    # A random model's attention follows its input and the noise level.
    assert all(value > 0 for value in report["input_variation"] + report["timestep_variation"])
    assert (tmp_path / "out" / "correlation.png").stat().st_size > 1000
    assert (tmp_path / "out" / "attention_vs_timestep.png").stat().st_size > 1000


def test_analyze_correlation_refuses_a_model_without_attention(tmp_path, capsys):
    DDPMPipeline(unet=tiny_model("none"), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    assert cli_main(["analyze-correlation", "--model", str(tmp_path / "pipe"), "--dataset", "digits"]) == 2
    assert "no channel attention" in capsys.readouterr().err


def test_analyze_correlation_refuses_a_stock_unet_and_timesteps_the_model_never_saw(tmp_path, capsys):
    torch.manual_seed(0)
    stock = UNet2DModel(**TINY_GREY_UNET)
    DDPMPipeline(unet=stock, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path / "stock"
    )
    argv = [
        "analyze-correlation",
        "--dataset",
        "digits",
        "--num_images",
        "2",
        "--out_dir",
        str(tmp_path / "out"),
    ]
    assert cli_main([*argv, "--model", str(tmp_path / "stock")]) == 2
    assert "holds a UNet2DModel, whose channel attention was never trained" in capsys.readouterr().err

    dia = DDPMPipeline(unet=tiny_model("dia_lstm"), scheduler=DDPMScheduler(num_train_timesteps=100))
    dia.save_pretrained(tmp_path / "dia")
    assert cli_main([*argv, "--model", str(tmp_path / "dia"), "--timesteps", "10", "250"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--timesteps 250: the model was trained on timesteps 0 to 99" in error
    assert not (tmp_path / "out").exists()


def test_a_failed_analysis_leaves_the_previous_out_dir_whole(tmp_path, capsys, monkeypatch):
    DDPMPipeline(unet=tiny_model("dia_lstm"), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["analyze-correlation", "--model", str(tmp_path / "pipe"), "--dataset", "digits"]
    argv += ["--num_images", "4", "--timesteps", "100", "600", "--out_dir", str(out)]
    assert cli_main([*argv, "--seed", "1"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(correlation, "draw_attention_vs_timestep", disk_full)
    capsys.readouterr()
    assert cli_main([*argv, "--seed", "2"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        f"dia-diffusion analyze-correlation: error: '{out / 'attention_vs_timestep.png'}' could not be written: "
        "No space left on device (the disk is full"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.lock", "out", "pipe"]
