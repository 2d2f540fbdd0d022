"""The attention-correlation analysis: the statistic itself, the recording, and the command end to end."""

import json

import numpy as np
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.cli import main as cli_main
from dia_diffusion.correlation import input_variation, layer_correlation, mean_off_diagonal, record_attention


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


def test_input_variation_is_zero_for_a_fixed_scale_and_the_channel_mean_std_otherwise():
    fixed = torch.rand(1, 6).expand(10, 6)
    varying = torch.rand(10, 6, generator=torch.Generator().manual_seed(1))
    assert input_variation([fixed, varying]) == [0.0, varying.double().std(dim=0).mean().item()]


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
    assert [v.shape for v in vectors] == [(6, site.channels) for site in model.resnet_sites]
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
    assert -1 <= report["mean_off_diagonal"] <= 1
    assert len(report["input_variation"]) == len(report["site_widths"])
    # A random model's attention follows its input.
    assert all(value > 0 for value in report["input_variation"])
    assert (tmp_path / "out" / "correlation.png").stat().st_size > 1000


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
