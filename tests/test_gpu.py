"""What only a CUDA device can check: bf16 autocast training, torch.compile with inductor, fp16 sampling and the
training command with all three. Every test here is `gpu`-marked and skipped where CUDA is absent;
`benchmarks/device_check.sh` runs them on a GPU machine."""

import json
import math

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.training.config import resolve_config
from dia_diffusion.training.loop import train

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

# The DDPM CIFAR-10 layout at a quarter of its widths: every block type of the real model, small enough to compile
# in well under a minute.
SMALL_DDPM = dict(
    sample_size=32,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_num_groups=16,
    dropout=0.0,
)


# Two levels, attention in the second: the compile test's graph, a third of SMALL_DDPM's, compiles in seconds.
TWO_LEVELS = dict(
    SMALL_DDPM,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def small_model(layout: dict = SMALL_DDPM) -> DIAUNet2DModel:
    torch.manual_seed(0)
    return DIAUNet2DModel(**layout).to(DEVICE)


def inputs(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    return images.to(DEVICE), timesteps.to(DEVICE)


def loss_and_gradients(
    model, images, timesteps, dtype, forward=None
) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one training step and the gradient of every parameter of `model`, run through `forward`
    (`model` itself, or its compiled form)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        prediction = (model if forward is None else forward)(images, timesteps).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), images)
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would blur the fp32 references these tests compare against."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bf16_autocast_training_step_follows_fp32():
    model = small_model()
    images, timesteps = inputs()
    loss_fp32, grads_fp32 = loss_and_gradients(model, images, timesteps, torch.float32)
    loss_bf16, grads_bf16 = loss_and_gradients(model, images, timesteps, torch.bfloat16)
    assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)
    # The shared attention module trains under autocast: finite gradients that point the same way as fp32's.
    for name, grad in grads_bf16.items():
        assert torch.isfinite(grad).all(), name
    attention = [name for name in grads_fp32 if name.startswith("channel_attention.")]
    reference = torch.cat([grads_fp32[name].flatten() for name in attention])
    candidate = torch.cat([grads_bf16[name].flatten() for name in attention])
    assert reference.norm() > 0
    assert torch.nn.functional.cosine_similarity(reference, candidate, dim=0) > 0.95


def test_inductor_compiled_dia_unet_matches_eager_forward_and_backward():
    model = small_model(TWO_LEVELS)
    images, timesteps = inputs()
    loss_eager, grads_eager = loss_and_gradients(model, images, timesteps, torch.float32)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    loss_compiled, grads_compiled = loss_and_gradients(model, images, timesteps, torch.float32, compiled)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-4)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_fp16_ddim_sampling_matches_fp32():
    model = small_model().eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)

    def sample(unet) -> torch.Tensor:
        pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(DEVICE).manual_seed(0)
        images = pipeline(batch_size=4, generator=generator, num_inference_steps=10, output_type="np").images
        return torch.from_numpy(images)

    reference = sample(model)
    half = sample(model.half())
    assert torch.isfinite(half).all()
    assert (half - reference).abs().mean() < 0.02


def test_training_command_runs_bf16_compiled_on_cuda(tmp_path, isolated_run):
    config = resolve_config(
        "demo",
        {
            "output_dir": str(tmp_path / "run"),
            "max_train_steps": 4,
            "train_batch_size": 16,
            "mixed_precision": "bf16",
            "compile": True,
            "checkpointing_steps": 2,
            "log_every": 2,
            "report_to": "none",
            "num_sample_images": 4,
            "sample_inference_steps": 2,
            "eval_every": 0,
        },
    )
    result = train(config)
    assert result.global_step == 4 and next(result.unet.parameters()).device.type == DEVICE
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and all(math.isfinite(row["loss"]) for row in rows)
    assert (tmp_path / "run" / "model_index.json").is_file()
