"""DIAUNet2DConditionModel and `apply_dia` as a drop-in for Stable Diffusion, SDXL and ControlNet (tiny components
built offline): exact under the identity gate, with FreeU and with a LoRA adapter; saved and reloaded exactly in a
fresh process; trained with gradient checkpointing and under `torch.compile`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_stable_diffusion as tiny
import torch
from conftest import TINY_GREY_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.resnet import ResnetBlock2D

from dia_diffusion import DIAUNet2DConditionModel, DIAUNet2DModel, apply_dia

PIPELINES = {
    "sd": (tiny.stable_diffusion, {}),
    "sdxl": (tiny.stable_diffusion_xl, {}),
    "controlnet": (tiny.stable_diffusion_controlnet, {"image": tiny.control_image()}),
}


def scramble_dia(unet) -> None:
    """Trained-looking DIA weights: the identity gate's zero gains would hide the attention from the output."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in unet.channel_attention.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("kind", PIPELINES)
def test_identity_gate_dia_pipeline_gives_the_stock_images_exactly(kind, tmp_path):
    make, arguments = PIPELINES[kind]
    pipeline = make(tmp_path)
    stock = tiny.images(pipeline, **arguments)
    assert apply_dia(pipeline) is pipeline
    assert type(pipeline.unet) is DIAUNet2DConditionModel and pipeline.unet.config.dia_gate == "identity"
    assert torch.equal(tiny.images(pipeline, **arguments), stock)
    scramble_dia(pipeline.unet)
    assert not torch.equal(tiny.images(pipeline, **arguments), stock)


def test_freeu_passes_through_dia_unchanged(tmp_path):
    pipeline = tiny.stable_diffusion(tmp_path)
    pipeline.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    stock = tiny.images(pipeline)
    pipeline.disable_freeu()
    assert not torch.equal(tiny.images(pipeline), stock)
    apply_dia(pipeline)
    pipeline.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert torch.equal(tiny.images(pipeline), stock)
    enabled_first = tiny.stable_diffusion(tmp_path)
    enabled_first.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert torch.equal(tiny.images(apply_dia(enabled_first)), stock)


def test_a_lora_adapter_saved_for_the_stock_unet_loads_into_dia_and_gives_the_stock_images(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    pipeline = tiny.stable_diffusion(tmp_path)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=2,
        init_lora_weights=False,  # random, not zero: the adapter must change the images
        target_modules=["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"],
    )
    torch.manual_seed(3)
    pipeline.unet.add_adapter(config)
    type(pipeline).save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipeline.unet)
    )
    with_lora = tiny.images(pipeline)

    with pytest.raises(
        ValueError, match="carries adapters .* apply DIA first, then load the adapters onto the DIA UNet"
    ):
        apply_dia(pipeline)

    fresh = apply_dia(tiny.stable_diffusion(tmp_path))
    assert not torch.equal(tiny.images(fresh), with_lora)
    fresh.load_lora_weights(tmp_path / "lora")
    targeted = [name for name, module in fresh.unet.named_modules() if name.endswith("conv1") and module]
    assert targeted and all(hasattr(fresh.unet.get_submodule(name), "lora_A") for name in targeted)
    assert torch.equal(tiny.images(fresh), with_lora)


FRESH_PROCESS = """
import sys, torch
import dia_diffusion
import tiny_stable_diffusion as tiny
from conftest import TINY_GREY_UNET
from diffusers import DiffusionPipeline
results = {}
for folder in sys.argv[2:]:
    pipeline = tiny.quiet(DiffusionPipeline.from_pretrained(folder))
    # safetensors leaves loaded weights at unaligned addresses, where vectorised kernels sum in another order (SDXL's
    # images then differ by 1e-6); in freshly allocated memory, as when the pipeline was saved, they are bitwise equal.
    with torch.no_grad():
        for component in pipeline.components.values():
            for parameter in getattr(component, "parameters", lambda: [])():
                parameter.data = parameter.data.clone()
    arguments = {"image": tiny.control_image()} if "ControlNet" in type(pipeline).__name__ else {}
    results[folder] = (type(pipeline.unet).__name__, tiny.images(pipeline, **arguments))
torch.save(results, sys.argv[1])
"""


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Every kind of pipeline, with DIA conditioned on the embedding and trained-looking DIA weights: its images,
    its model_index.json, and what one fresh process that imports only dia_diffusion loads from it."""
    folder = tmp_path_factory.mktemp("reloaded")
    saved = {}
    for kind, (make, arguments) in PIPELINES.items():
        pipeline = apply_dia(make(folder / kind), dia_condition="timestep")
        scramble_dia(pipeline.unet)
        pipeline.save_pretrained(folder / kind / "saved")
        index = json.loads((folder / kind / "saved" / "model_index.json").read_text())
        saved[kind] = (tiny.images(pipeline, **arguments), index)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder / "out.pt")]
        + [str(folder / kind / "saved") for kind in PIPELINES],
        capture_output=True,
        text=True,
        timeout=300,
        # The same number of threads as here: another would sum in another order.
        env={
            "PYTHONPATH": str(Path(__file__).parent),
            "PATH": "",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = torch.load(folder / "out.pt")
    return {kind: (*saved[kind], *loaded[str(folder / kind / "saved")]) for kind in PIPELINES}


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_saved_dia_pipeline_reloads_in_a_fresh_process_and_gives_the_same_images(kind, reloaded):
    expected, index, class_name, images = reloaded[kind]
    assert index["unet"] == ["dia_diffusion", "DIAUNet2DConditionModel"]
    assert class_name == "DIAUNet2DConditionModel"
    assert torch.equal(images, expected)


def sd_unet(**dia_options) -> DIAUNet2DConditionModel:
    torch.manual_seed(0)
    unet = DIAUNet2DConditionModel(**tiny.SD_UNET, dia_reduction=2, **dia_options)
    scramble_dia(unet)
    return unet


def sd_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 5, tiny.SD_UNET["cross_attention_dim"], generator=generator)
    return sample, torch.tensor([10, 900]), text


def gradients(unet) -> dict[str, torch.Tensor]:
    unet.zero_grad()
    unet(*sd_inputs()).sample.square().mean().backward()
    return {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in unet.named_parameters()}


def test_gradient_checkpointing_gives_the_eager_gradients_of_an_sd_unet():
    unet = sd_unet(dia_condition="timestep")
    eager = gradients(unet)
    unet.enable_gradient_checkpointing()
    checkpointed = gradients(unet)
    for name, gradient in eager.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_an_sd_unet_compiles_as_one_graph_and_trains():
    unet = sd_unet(dia_condition="timestep")
    eager = gradients(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    for name, gradient in gradients(compiled).items():
        torch.testing.assert_close(gradient, eager[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "layout,embedding",
    [
        (dict(), 16),  # the time embedding: 4 x the first width
        (dict(num_class_embeds=3, class_embeddings_concat=True), 32),  # time and class side by side
        (tiny.SDXL_UNET, 8),  # SDXL's text_time embedding is added into the time embedding
    ],
    ids=["time", "class_concatenated", "sdxl_text_time"],
)
def test_the_timestep_condition_projects_the_whole_embedding_every_resnet_receives(layout, embedding):
    settings = {**tiny.SD_UNET, **layout}
    unet = DIAUNet2DConditionModel(**settings, dia_condition="timestep")
    widths = {resnet.time_emb_proj.in_features for _, resnet in unet.resnets_in_order()}
    assert widths == {embedding}
    assert unet.channel_attention.condition_projection.in_features == embedding


def test_a_stock_folder_loads_as_a_retrofit_with_the_stock_output(tmp_path):
    torch.manual_seed(0)
    stock = UNet2DConditionModel(**tiny.SD_UNET).eval()
    stock.save_pretrained(tmp_path / "stock")
    unet = DIAUNet2DConditionModel.from_pretrained(tmp_path / "stock", dia_sharing="per_block").eval()
    assert unet.config.dia_gate == "identity" and unet.config.dia_sharing == "per_block"
    with torch.no_grad():
        assert torch.equal(unet(*sd_inputs()).sample, stock(*sd_inputs()).sample)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_retrofit_keeps_the_mode_of_the_stock_unet_so_dropout_acts_alike(mode):
    torch.manual_seed(0)
    stock = UNet2DModel(**TINY_GREY_UNET, dropout=0.5).train(mode == "train")
    retrofit = apply_dia(stock)
    assert retrofit.training == stock.training
    sample, timestep = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        torch.manual_seed(1)
        expected = stock(sample, timestep).sample
        torch.manual_seed(1)
        assert torch.equal(retrofit(sample, timestep).sample, expected)


class ScaledAttnProcessor(torch.nn.Module):
    """A processor with a weight of its own, as adapters' processors have."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def __call__(self, attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.scale * AttnProcessor()(attention, hidden_states, encoder_hidden_states, attention_mask)


@pytest.mark.parametrize("processor", [AttnProcessor, ScaledAttnProcessor])
def test_a_retrofit_keeps_the_attention_processors_of_the_stock_unet_as_its_own(processor):
    torch.manual_seed(0)
    stock = UNet2DConditionModel(**tiny.SD_UNET).eval()
    stock.set_attn_processor(processor())
    retrofit = apply_dia(stock)
    processors = retrofit.attn_processors
    assert processors.keys() == stock.attn_processors.keys()
    assert all(type(copied) is processor for copied in processors.values())
    assert not set(map(id, processors.values())) & set(map(id, stock.attn_processors.values()))
    # A processor's weights are copied, not shared: training the retrofit leaves the stock UNet as it was.
    stock_parameters = {id(parameter) for parameter in stock.parameters()}
    assert not any(id(parameter) in stock_parameters for parameter in retrofit.parameters())
    with torch.no_grad():
        assert torch.equal(retrofit(*sd_inputs()).sample, stock(*sd_inputs()).sample)


def test_a_unet_with_an_ip_adapter_loaded_is_refused_in_one_line():
    stock = UNet2DConditionModel(**tiny.SD_UNET)
    stock.register_to_config(encoder_hid_dim_type="ip_image_proj")  # as diffusers' load_ip_adapter marks it
    with pytest.raises(ValueError, match="^the UNet carries adapters .*IP-Adapter"):
        apply_dia(stock)


def test_blocks_not_built_from_resnet_block_2d_are_refused_by_name():
    with pytest.raises(
        ValueError, match="^block type KDownBlock2D is not supported by DIAUNet2DConditionModel"
    ):
        DIAUNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D"),
            up_block_types=("KCrossAttnUpBlock2D", "KUpBlock2D"),
            mid_block_type=None,
            cross_attention_dim=32,
            resnet_time_scale_shift="scale_shift",
            time_embedding_type="positional",
        )


def test_apply_dia_retrofits_an_unconditional_pipeline_and_a_bare_unet():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_GREY_UNET)
    pipeline = apply_dia(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)))
    assert type(pipeline.unet) is DIAUNet2DModel
    assert type(apply_dia(unet, dia_sharing="per_width")) is DIAUNet2DModel
    with pytest.raises(ValueError, match="already a DIAUNet2DModel"):
        apply_dia(pipeline)
    with pytest.raises(
        ValueError, match="^DIA applies to a UNet2DConditionModel, UNet2DModel, not to a ResnetBlock2D"
    ):
        apply_dia(ResnetBlock2D(in_channels=4, groups=2))
