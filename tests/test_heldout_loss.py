"""The held-out denoising loss: fixed inputs (a pure function of seed and image index), exact arithmetic against a
hand computation, pairing between models, and the `dia-diffusion heldout-loss` command."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.cli import main as cli_main
from dia_diffusion.evaluation.heldout_loss import band_timesteps, heldout_loss


class PredictsZero(torch.nn.Module):
    """A denoiser that always predicts 0, and records what it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, sample, timestep):
        self.inputs.append((sample.clone(), timestep.clone()))
        return UNet2DOutput(sample=torch.zeros_like(sample) * self.anchor)


def test_band_timesteps_are_evenly_spaced_inside_equal_bands():
    assert band_timesteps(1000, 5, 2) == [[50, 150], [250, 350], [450, 550], [650, 750], [850, 950]]
    assert band_timesteps(100, 2, 1) == [[25], [75]]


def test_the_loss_of_a_zero_predictor_is_the_mean_square_of_the_fixed_noise():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    bands = [[10, 30], [60, 80]]
    result = heldout_loss(PredictsZero(), scheduler, images, bands, seed=3, batch_size=2)

    # By hand: image j's noise is default_rng([seed, j]).standard_normal((4 timesteps, 1, 4, 4)).
    noise = np.stack(
        [np.random.default_rng([3, j]).standard_normal((4, 1, 4, 4), np.float32) for j in range(5)]
    )
    per_timestep = (noise.astype(np.float64) ** 2).mean(axis=(0, 2, 3, 4))
    assert [result["per_timestep"][str(t)] for t in (10, 30, 60, 80)] == pytest.approx(per_timestep, rel=1e-6)
    assert [row["loss"] for row in result["per_band"]] == pytest.approx(
        [per_timestep[:2].mean(), per_timestep[2:].mean()], rel=1e-6
    )
    assert [row["band"] for row in result["per_band"]] == [[0, 50], [50, 100]]
    assert result["heldout_loss"] == pytest.approx(per_timestep.mean(), rel=1e-6)


def test_every_model_sees_the_same_inputs_whatever_the_batch_size():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    first, second = PredictsZero(), PredictsZero()
    heldout_loss(first, scheduler, images, [[10], [60]], seed=0, batch_size=2)
    heldout_loss(second, scheduler, images, [[10], [60]], seed=0, batch_size=5)

    def inputs_at(model, timestep):
        return torch.cat([sample for sample, timesteps in model.inputs if timesteps[0] == timestep])

    for timestep in (10, 60):
        assert len(inputs_at(first, timestep)) == 5
        assert torch.equal(inputs_at(first, timestep), inputs_at(second, timestep))
    other_seed = heldout_loss(PredictsZero(), scheduler, images, [[10], [60]], seed=1)
    same_seed = heldout_loss(PredictsZero(), scheduler, images, [[10], [60]], seed=0)
    assert other_seed["heldout_loss"] != same_seed["heldout_loss"]


def test_a_retrofit_with_the_identity_gate_has_exactly_the_stock_loss():
    torch.manual_seed(0)
    stock = UNet2DModel(**TINY_GREY_UNET)
    retrofit = DIAUNet2DModel.from_unet(stock)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    bands = band_timesteps(100, 2, 2)
    assert heldout_loss(stock, scheduler, images, bands, seed=0) == heldout_loss(
        retrofit, scheduler, images, bands, seed=0
    )


def test_the_command_evaluates_a_saved_pipeline(tmp_path, capsys):
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_GREY_UNET), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "run"
    )
    arguments = ["heldout-loss", "--model", str(tmp_path / "run"), "--dataset", "digits", "--num_images", "6"]
    assert (
        cli_main([*arguments, "--bands", "2", "--per_band", "1", "--out", str(tmp_path / "loss.json")]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "loss.json").read_text())
    assert (result["num_images"], result["split"], list(result["per_timestep"])) == (
        6,
        "test",
        ["250", "750"],
    )
    assert result["heldout_loss"] > 0
    assert cli_main([*arguments, "--bands", "0"]) == 2
    assert "--bands must be positive" in capsys.readouterr().err


def test_a_class_conditional_model_is_scored_on_each_image_s_true_class():
    torch.manual_seed(0)
    unet = DIAUNet2DModel(**TINY_GREY_UNET, num_class_embeds=4).eval()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.tensor([2, 0, 1])
    result = heldout_loss(unet, scheduler, images, [[40]], seed=3, labels=labels)
    # By hand: the fixed noise of image j is drawn from (seed, j); the UNet sees each image's own label.
    noise = torch.stack(
        [
            torch.from_numpy(np.random.default_rng([3, j]).standard_normal((1, 1, 8, 8), np.float32))[0]
            for j in range(3)
        ]
    )
    t = torch.full((3,), 40)
    with torch.no_grad():
        prediction = unet(scheduler.add_noise(images, noise, t), t, labels).sample
    assert result["heldout_loss"] == pytest.approx((prediction - noise).square().mean().item(), rel=1e-5)
    other = heldout_loss(unet, scheduler, images, [[40]], seed=3, labels=torch.tensor([1, 1, 1]))
    assert other["heldout_loss"] != pytest.approx(result["heldout_loss"], rel=1e-5)
