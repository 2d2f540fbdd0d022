"""What one observed training run shows from the inside: sampling and evaluation mid-run leave the weights alone, the
EMA decays once per optimizer step under gradient accumulation, every optimizer step is clipped, and the loss sees
the prediction type and flipped images."""

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_DATASET_SIZE, isolated_accelerate
from diffusers.training_utils import EMAModel
from tiny_training import assert_same_weights, tiny_config, watch_the_loss
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dia_diffusion.data.image_datasets import add_training_transform, load_image_dataset
from dia_diffusion.training.ema import EMA_WARMUP_POWER
from dia_diffusion.training.loop import train

pytestmark = pytest.mark.usefixtures("isolated_run")

OBSERVED_RUN = {
    "max_train_steps": 4,
    "gradient_accumulation_steps": 2,
    "random_flip": True,
    "prediction_type": "v_prediction",
    # Far below the gradient norm of a fresh model, so that every optimizer step is clipped.
    "max_grad_norm": 1e-3,
    "ema_decay": 0.999,
    "ema_warmup": True,
}


@pytest.fixture(scope="module")
def observed_runs(tiny_dataset, classifier_cache, tmp_path_factory):
    """The same run twice: once watched from the inside (what each loss saw, each EMA update, each optimizer step's
    gradient), once sampling at every step and evaluating at every second step."""
    watched = {"losses": [], "ema_updates": [], "gradient_norms": []}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", classifier_cache)
        hook = watch_the_loop(patch, watched)
        try:
            with isolated_accelerate():
                plain = train(tiny_config(tiny_dataset, tmp_path_factory.mktemp("plain"), **OBSERVED_RUN))
        finally:
            hook.remove()
    with pytest.MonkeyPatch.context() as patch, isolated_accelerate():
        patch.setenv("XDG_CACHE_HOME", classifier_cache)
        mid_run = {"sample_every": 1, "eval_every": 2, "eval_num_samples": 8, "eval_inference_steps": 2}
        sampling = train(
            tiny_config(tiny_dataset, tmp_path_factory.mktemp("sampling"), **OBSERVED_RUN, **mid_run)
        )
    return SimpleNamespace(plain=plain, watched=watched, sampling=sampling)


def watch_the_loop(patch: pytest.MonkeyPatch, watched: dict):
    """Records into `watched`; returns the optimizer hook's handle, which the caller removes."""
    real_ema_step = EMAModel.step

    def watched_ema_step(self, parameters):
        parameters = list(parameters)
        watched["ema_updates"].append([parameter.detach().clone() for parameter in parameters])
        return real_ema_step(self, parameters)

    def record_gradient_norm(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.AdamW):
            gradients = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
            watched["gradient_norms"].append(torch.linalg.vector_norm(torch.cat(gradients)).item())

    watch_the_loss(patch, watched["losses"])
    patch.setattr(EMAModel, "step", watched_ema_step)
    return register_optimizer_step_pre_hook(record_gradient_norm)


def test_sampling_and_evaluating_mid_run_leave_the_trained_weights_unchanged(observed_runs):
    plain, sampling = observed_runs.plain, observed_runs.sampling
    assert plain.global_step == sampling.global_step == OBSERVED_RUN["max_train_steps"]
    assert_same_weights(plain, sampling)


def test_the_ema_decays_once_per_optimizer_step_under_gradient_accumulation(observed_runs):
    updates, steps = observed_runs.watched["ema_updates"], OBSERVED_RUN["max_train_steps"]
    assert len(updates) == observed_runs.plain.ema.optimization_step == steps
    # Every update sees new weights: it follows an optimizer step, never a lone micro-batch.
    for before, after in zip(updates, updates[1:]):
        assert not all(map(torch.equal, before, after))
    # By hand: the first update copies the weights; then decay_k = min(ema_decay, 1 - k^-power) at optimizer step k.
    shadow = [weights.clone() for weights in updates[0]]
    for step, weights in enumerate(updates[1:], start=1):
        decay = min(OBSERVED_RUN["ema_decay"], 1 - (1 + step) ** -EMA_WARMUP_POWER)
        shadow = [decay * s + (1 - decay) * w for s, w in zip(shadow, weights, strict=True)]
    for expected, actual in zip(shadow, observed_runs.plain.ema.shadow_params, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_every_optimizer_step_clips_the_accumulated_gradient(observed_runs):
    norms = observed_runs.watched["gradient_norms"]
    assert len(norms) == OBSERVED_RUN["max_train_steps"]
    assert norms == pytest.approx([OBSERVED_RUN["max_grad_norm"]] * len(norms), rel=1e-3)


def test_the_loss_sees_the_prediction_type_and_flipped_training_images(observed_runs, tiny_dataset):
    losses = observed_runs.watched["losses"]
    assert len(losses) == OBSERVED_RUN["max_train_steps"] * OBSERVED_RUN["gradient_accumulation_steps"]
    assert {prediction_type for _, prediction_type in losses} == {OBSERVED_RUN["prediction_type"]}
    pixels = add_training_transform(load_image_dataset(tiny_dataset), 8, 1, random_flip=False)
    originals = torch.stack([pixels[index]["pixel_values"] for index in range(TINY_DATASET_SIZE)])
    seen = torch.cat([images for images, _ in losses])

    def is_among(image, candidates):
        return any(torch.equal(image, candidate) for candidate in candidates)

    mirrored = [not is_among(image, originals) and is_among(image, originals.flip(-1)) for image in seen]
    assert all(mirrored[i] or is_among(image, originals) for i, image in enumerate(seen))
    assert 0.25 < sum(mirrored) / len(seen) < 0.75
