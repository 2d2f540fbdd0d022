"""The comparisons `quality.py` runs: the variants (as training flags), and each budget's recipe, seeds and
measurements. Why each budget has its step count is in the comments beside it; how a budget is run, in quality.py."""

import dataclasses
from dataclasses import dataclass

VARIANTS = {
    "stock": ["--unet", "stock"],
    "se-per-layer": ["--unet", "se-per-layer"],
    "se-shared": ["--unet", "se-shared"],
    "dia-global": ["--unet", "dia", "--dia_sharing", "global"],
    "dia-per-width": ["--unet", "dia", "--dia_sharing", "per_width"],
    "dia-per-block": ["--unet", "dia", "--dia_sharing", "per_block"],
    # The gate question: the same model with an identity-at-init gate instead of the paper's sigmoid.
    "dia-identity-gate": ["--unet", "dia", "--dia_sharing", "global", "--dia_gate", "identity"],
    # Attention that can follow the noise level, and a global cell that runs at the widest width.
    "dia-timestep": ["--unet", "dia", "--dia_sharing", "global", "--dia_condition", "timestep"],
    "dia-widest": ["--unet", "dia", "--dia_sharing", "global", "--dia_global_cell", "widest"],
    "dia-widest-timestep": [
        "--unet",
        "dia",
        "--dia_sharing",
        "global",
        "--dia_global_cell",
        "widest",
        "--dia_condition",
        "timestep",
    ],  # fmt: skip
    "dia-per-block-timestep": ["--unet", "dia", "--dia_sharing", "per_block", "--dia_condition", "timestep"],
}
EARLIER_VARIANTS = tuple(list(VARIANTS)[:7])
# Chosen before the runs: the baseline, SE in every resnet, today's default DIA, and the adaptive DIA variants.
DECIDING_VARIANTS = (
    "stock",
    "se-per-layer",
    "dia-global",
    "dia-timestep",
    "dia-widest-timestep",
    "dia-per-block-timestep",
)
# The class-conditional comparison, fixed before its runs: stock, global DIA, and the shared cell conditioned on the
# whole embedding the resnets receive (in a class-conditional UNet2DModel the time embedding plus the class
# embedding), at the bottleneck width and at the widest width.
CLASS_CONDITIONAL_VARIANTS = ("stock", "dia-global", "dia-timestep", "dia-widest-timestep")
# Under --init_unet every DIA variant starts with the identity gate; dia-widest-timestep combines both adaptive
# changes, chosen before the runs as "the best adaptive variant".
RETROFIT_VARIANTS = ("stock", "dia-global", "dia-widest-timestep")


@dataclass(frozen=True)
class Budget:
    """What every run of a comparison trains and measures; the same for every variant."""

    preset: str
    dataset: str
    resolution: int
    steps: int
    batch: int
    samples: int  # FD samples per run (DDIM with ddim_steps)
    ddim_steps: int
    eval_every: int  # FD during training, for the FD-vs-step figure
    eval_samples: int
    flags: tuple[str, ...] = ()  # further training flags
    channels: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = EARLIER_VARIANTS
    heldout_images: int = 0  # test images of the held-out loss (0: not measured)
    checkpointing_steps: int = 0  # 0: the preset's
    pilot_steps: int = 0
    pilot_eval_every: int = 0
    base: str | None = None  # a retrofit budget continues the stock models of this budget
    seed_offset: int = 0  # a run at seed s trains with --seed s + seed_offset


# Which runs make up a comparison, and how often they checkpoint: neither changes what a run computes. The other
# Budget fields are how each run is trained and measured.
RESULT_NEUTRAL_FIELDS = ("seeds", "variants", "pilot_steps", "pilot_eval_every", "checkpointing_steps")


# `cpu` is Fashion-MNIST with the fmnist-32 UNet layout at 16x16: 32x32 costs 1.8 s per step on one CPU thread,
# 16x16 0.43 s, which puts 7 variants x 3 seeds at about 2 hours on 2 cores (`--jobs 2`). Its 1000 steps need a
# larger learning rate and a shorter warmup than the preset's 20k-step recipe. `digits` is a smaller stand-in.
# `digits8` and `fmnist16`: the step counts are where stock's FD flattened in each pilot (quality-<budget>/pilot/):
# digits 0.70 at 4000 steps, 0.60-0.84 from 4500 to 12000; Fashion-MNIST 2.51 at 4500, 2.10-2.71 from 5000 to 8000.
# A digits step (demo layout, batch 64) costs about 0.12 s of one core, a 16x16 Fashion-MNIST step at batch 32 about
# 0.3 s; FD, held-out loss and start-up add about 1 minute per digits run and 3 per Fashion-MNIST run. At --jobs 2
# the 30 runs of digits8 take about 3 hours and those of fmnist16 about 7: a comparison of several sittings.
DIGITS8 = Budget(
    preset="demo", dataset="digits", resolution=8, steps=4000, batch=64, samples=1000, ddim_steps=25,
    eval_every=1000, eval_samples=300, seeds=(0, 1, 2, 3, 4), variants=DECIDING_VARIANTS, heldout_images=297,
    checkpointing_steps=500, flags=("--eval_inference_steps", "25"), pilot_steps=12000, pilot_eval_every=500,
)  # fmt: skip
FMNIST16 = Budget(
    preset="fmnist-32", dataset="fashion_mnist", resolution=16, steps=4500, batch=32, samples=2000, ddim_steps=25,
    eval_every=1500, eval_samples=200, seeds=(0, 1, 2, 3, 4), variants=DECIDING_VARIANTS, heldout_images=1000,
    checkpointing_steps=500, pilot_steps=8000, pilot_eval_every=500,
    flags=("--learning_rate", "1e-3", "--lr_warmup_steps", "100", "--sample_inference_steps", "100",
           "--eval_inference_steps", "25"),
)  # fmt: skip
# The gpu budgets: the fmnist-32 recipe at 32x32 (20k steps at batch 128), Fashion-MNIST, and CIFAR-10 in colour
# with the same layout; 10k FD samples and the whole test split for the held-out loss.
GPU = Budget(
    preset="fmnist-32", dataset="fashion_mnist", resolution=32, steps=20000, batch=128, samples=10000,
    ddim_steps=50, eval_every=2500, eval_samples=2000, seeds=(0, 1, 2, 3, 4), variants=DECIDING_VARIANTS,
    heldout_images=10000, checkpointing_steps=2000, flags=("--sample_inference_steps", "100"),
    pilot_steps=60000, pilot_eval_every=2500,
)  # fmt: skip
GPU_CIFAR10 = dataclasses.replace(GPU, dataset="cifar10", channels=3, steps=40000, pilot_steps=100000)


def retrofit(base: str, steps: int, checkpointing_steps: int) -> Budget:
    """Continue each seed's stock model of `base` for `steps` more steps with its recipe (a fresh optimizer), as
    stock and as retrofitted DIA."""
    return dataclasses.replace(
        BUDGETS[base],
        base=base,
        steps=steps,
        eval_every=steps // 2,
        checkpointing_steps=checkpointing_steps,
        variants=RETROFIT_VARIANTS,
        pilot_steps=0,
        pilot_eval_every=0,
        seed_offset=1000,
    )


BUDGETS = {
    "smoke": Budget(preset="demo", dataset="digits", resolution=8, steps=4, batch=8, samples=64, ddim_steps=5,
                    eval_every=2, eval_samples=32, flags=("--sample_inference_steps", "5")),
    "digits": Budget(preset="demo", dataset="digits", resolution=8, steps=800, batch=64, samples=1000,
                     ddim_steps=25, eval_every=200, eval_samples=300, flags=("--eval_inference_steps", "100")),
    "cpu": Budget(preset="fmnist-32", dataset="fashion_mnist", resolution=16, steps=1000, batch=64, samples=2000,
                  ddim_steps=25, eval_every=500, eval_samples=200,
                  flags=("--learning_rate", "1e-3", "--lr_warmup_steps", "100", "--sample_inference_steps", "100")),
    "digits8": DIGITS8,
    "fmnist16": FMNIST16,
    "gpu": GPU,
    "gpu-cifar10": GPU_CIFAR10,
}  # fmt: skip
# `class-fmnist16`: the fmnist16 recipe (its steps, samples and held-out images) trained on the labels, sampled
# class-balanced with classifier-free guidance 1.5 (DiT's FID-optimal scale), fixed before its runs. Training and
# sampling read the guidance from the same flag.
BUDGETS["class-fmnist16"] = dataclasses.replace(
    FMNIST16,
    variants=CLASS_CONDITIONAL_VARIANTS,
    flags=(*FMNIST16.flags, "--class_conditional", "--guidance_scale", "1.5"),
    pilot_steps=0,
    pilot_eval_every=0,
)
BUDGETS["class-smoke"] = dataclasses.replace(
    BUDGETS["smoke"], flags=(*BUDGETS["smoke"].flags, "--class_conditional", "--guidance_scale", "1.5")
)
BUDGETS["retrofit-digits8"] = retrofit("digits8", steps=2000, checkpointing_steps=500)
BUDGETS["retrofit-fmnist16"] = retrofit("fmnist16", steps=1500, checkpointing_steps=500)
BUDGETS["gpu-retrofit"] = retrofit("gpu", steps=5000, checkpointing_steps=1000)
BUDGETS["retrofit-smoke"] = retrofit("smoke", steps=4, checkpointing_steps=2)


def guidance_scale(budget: Budget) -> float | None:
    """The classifier-free guidance a class-conditional budget trains and samples with; None for an unconditional
    one. It is a training flag, so that the evaluation during training and the final FD use the same value."""
    flags = list(budget.flags)
    if "--class_conditional" not in flags:
        return None
    return float(flags[flags.index("--guidance_scale") + 1]) if "--guidance_scale" in flags else 1.0
