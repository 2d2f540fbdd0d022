"""The training step's parts against hand computations: the loss target of every prediction type, the random flip,
the clipped update, the non-finite guard, and sampling under the EMA weights."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_GREY_UNET
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tiny_training import watch_the_loss

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.config import PREDICTION_TYPES, TrainingConfig
from dia_diffusion.training.ema import ema_weights
from dia_diffusion.training.step import diffusion_loss, training_step
from dia_diffusion.training.tasks import random_horizontal_flip


def test_sampling_under_the_ema_weights_restores_the_weights_the_mode_and_the_random_streams():
    torch.manual_seed(0)
    unet = DIAUNet2DModel(**TINY_GREY_UNET)
    ema = EMAModel(unet.parameters())
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(1.0)
    training_weights = [parameter.detach().clone() for parameter in unet.parameters()]
    random_state = torch.get_rng_state()
    with ema_weights(ema, unet, torch.device("cpu")):
        assert not unet.training
        assert all(map(torch.equal, unet.parameters(), ema.shadow_params))
        torch.rand(100)  # sampling draws from the global stream
    assert unet.training
    assert all(map(torch.equal, unet.parameters(), training_weights))
    assert torch.equal(torch.get_rng_state(), random_state)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_loss_regresses_the_target_of_the_prediction_type(prediction_type):
    steps = 10
    scheduler = DDPMScheduler(num_train_timesteps=steps, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(256, 1, 2, 2, generator=generator, dtype=torch.float64) * 2 - 1
    prediction = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    seen = {}

    def unet(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return SimpleNamespace(sample=prediction)

    torch.manual_seed(0)  # the noise and timesteps come from the global stream
    loss = diffusion_loss(unet, scheduler, clean)
    timesteps = seen["timesteps"]
    assert timesteps.min() == 0 and timesteps.max() == steps - 1
    # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4): recover ε from what the UNet saw.
    signal = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    noise = (seen["noisy"] - signal.sqrt() * clean) / (1 - signal).sqrt()
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    target = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": signal.sqrt() * noise - (1 - signal).sqrt() * clean,  # Salimans & Ho 2022
    }[prediction_type]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (prediction - target).square().mean().float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_each_image_by_the_clipped_signal_to_noise_ratio(prediction_type):
    steps, gamma = 20, 5.0
    scheduler = DDPMScheduler(num_train_timesteps=steps, prediction_type=prediction_type)
    clean = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prediction = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}

    def unet(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return SimpleNamespace(sample=prediction)

    torch.manual_seed(0)
    weighted = diffusion_loss(unet, scheduler, clean, snr_gamma=gamma)
    # By hand: SNR(t) = ᾱ_t / (1 - ᾱ_t); Min-SNR-γ (Hang et al. 2023) weights the ε loss by min(SNR, γ) / SNR, the v
    # loss by min(SNR, γ) / (SNR + 1) and the x_0 loss by min(SNR, γ).
    signal = scheduler.alphas_cumprod.double()[seen["timesteps"]]
    snr = signal / (1 - signal)
    weight = {
        "epsilon": snr.clamp(max=gamma) / snr,
        "v_prediction": snr.clamp(max=gamma) / (snr + 1),
        "sample": snr.clamp(max=gamma),
    }[prediction_type]
    signal = signal.view(-1, 1, 1, 1)
    noise = (seen["noisy"] - signal.sqrt() * clean) / (1 - signal).sqrt()
    target = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": signal.sqrt() * noise - (1 - signal).sqrt() * clean,
    }[prediction_type]
    per_image = (prediction - target).square().mean(dim=(1, 2, 3))
    assert (weight != 1).any()
    torch.testing.assert_close(weighted, (weight * per_image).mean().float(), rtol=1e-5, atol=0)


def test_the_noise_offset_shifts_each_channel_of_each_image_by_its_own_constant():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    clean = torch.zeros(256, 3, 4, 4)
    seen = {}

    def unet(noisy, timesteps):
        seen.update(noisy=noisy, timesteps=timesteps)
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    torch.manual_seed(0)
    diffusion_loss(unet, scheduler, clean, noise_offset=0.5)
    torch.manual_seed(0)
    noise = torch.randn_like(clean)
    offset = 0.5 * torch.randn(256, 3, 1, 1)  # drawn after the noise, from the same stream
    scale = (1 - scheduler.alphas_cumprod[seen["timesteps"]]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], scale * (noise + offset))


def test_random_flip_mirrors_about_half_the_images_left_to_right():
    images = torch.rand(64, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    flipped = random_horizontal_flip(images)
    mirrored = [torch.equal(after, before.flip(-1)) for after, before in zip(flipped, images)]
    kept = [torch.equal(after, before) for after, before in zip(flipped, images)]
    assert all(m != k for m, k in zip(mirrored, kept))
    assert 20 < sum(mirrored) < 44


def one_training_step(images: torch.Tensor, **settings):
    """training_step on a tiny DIA UNet with plain SGD at lr 1, so that the update IS the (clipped) gradient."""
    accelerator = Accelerator()
    torch.manual_seed(0)
    unet = DIAUNet2DModel(**TINY_GREY_UNET)
    optimizer = torch.optim.SGD(unet.parameters(), lr=1.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    before = [parameter.detach().clone() for parameter in unet.parameters()]
    config = TrainingConfig(output_dir="unused", **settings)
    losses = training_step(
        accelerator, unet, optimizer, DDPMScheduler(num_train_timesteps=10), {"pixel_values": images}, config
    )
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(unet.parameters(), before, strict=True)])
    return losses, update, unet


def test_a_training_step_clips_the_gradient_then_steps_and_clears_it():
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses, update, unet = one_training_step(images, max_grad_norm=0.01)
    assert losses.shape == (1,) and torch.isfinite(losses).all()
    assert torch.linalg.vector_norm(update).item() == pytest.approx(0.01, rel=1e-4)
    assert all(parameter.grad is None for parameter in unet.parameters())


def test_a_training_step_with_a_non_finite_loss_changes_nothing():
    images = torch.full((4, 1, 8, 8), float("nan"))
    losses, update, unet = one_training_step(images)
    assert not torch.isfinite(losses).any()
    assert not update.any() and all(parameter.grad is None for parameter in unet.parameters())


@pytest.mark.parametrize("random_flip", [False, True])
def test_a_training_step_flips_only_when_asked(random_flip, monkeypatch):
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    watch_the_loss(monkeypatch, seen)
    one_training_step(images, random_flip=random_flip)
    ((clean_images, _),) = seen
    unchanged = [torch.equal(after, before) for after, before in zip(clean_images, images)]
    assert all(unchanged) != random_flip


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, {}),  # DDPM's loss, and not one draw more from the random stream
        ({"snr_gamma": 5.0}, {"snr_gamma": 5.0}),
        ({"noise_offset": 0.1}, {"noise_offset": 0.1}),
        ({"snr_gamma": 1.0, "noise_offset": 0.05}, {"snr_gamma": 1.0, "noise_offset": 0.05}),
    ],
)
def test_a_training_step_gives_the_loss_the_settings_of_the_config(settings, expected, monkeypatch):
    seen = []
    real_loss = training_steps.diffusion_loss

    def watched_loss(unet, noise_scheduler, clean_images, **options):
        seen.append(options)
        return real_loss(unet, noise_scheduler, clean_images, **options)

    monkeypatch.setattr(training_steps, "diffusion_loss", watched_loss)
    one_training_step(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), **settings)
    assert seen == [expected]
