"""DIAUNet2DModel on tiny configs, in the spirit of diffusers' own model tests."""

import copy
import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ALL_BLOCKS_CONFIG, inputs, tiny_config
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.cli import main as cli_main
from dia_diffusion.commands.params import count_parameters, parameter_counts, preset_unet_config
from dia_diffusion.models.channel_attention import ATTENTION_KINDS, GATES, SHARING_MODES


def build(seed: int = 0, **config) -> DIAUNet2DModel:
    torch.manual_seed(seed)
    return DIAUNet2DModel(**tiny_config(**config))


def test_is_a_unet2dmodel_with_every_argument_in_its_config():
    model = build(dia_sharing="per_width", dia_reduction=2)
    assert isinstance(model, UNet2DModel)
    assert model.config.dia_sharing == "per_width" and model.config.dia_reduction == 2
    assert model.config.block_out_channels == (16, 32)
    stock_arguments = set(UNet2DModel.extract_init_dict(dict(UNet2DModel().config))[0])
    assert stock_arguments <= set(model.config)


def test_output_shape_dtype_and_finite():
    model = build().eval()
    sample, timestep = inputs()
    with torch.no_grad():
        output = model(sample, timestep).sample
    assert output.shape == sample.shape and output.dtype == torch.float32
    assert torch.isfinite(output).all()
    assert model(sample, timestep, return_dict=False)[0].shape == sample.shape


def test_resnet_sites_follow_forward_order_and_count():
    config = preset_unet_config("cifar10-ddpm")
    with torch.device("meta"):
        model = DIAUNet2DModel(**config)
    # DDPM CIFAR-10 layout: 4 down blocks x 2 resnets, 2 mid resnets, 4 up blocks x 3 resnets.
    assert len(model.resnet_sites) == 22
    assert [site.channels for site in model.resnet_sites[:3]] == [128, 128, 256]
    assert model.resnet_sites[-1].channels == 128


def test_retrofit_copies_every_stock_weight_and_initialises_the_new_ones():
    torch.manual_seed(0)
    stock = UNet2DModel(**tiny_config())
    model = DIAUNet2DModel.from_unet(stock, dia_sharing="per_width")
    new_state = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(new_state[key], value), key
    added = [
        parameter for name, parameter in model.named_parameters() if name.startswith("channel_attention.")
    ]
    assert added and all(not p.is_meta and torch.isfinite(p).all() for p in added)
    with pytest.raises(ValueError, match="dia_colour"):
        DIAUNet2DModel.from_unet(stock, dia_colour="red")


def test_stock_checkpoint_loads_without_meta_parameters(tmp_path):
    torch.manual_seed(0)
    stock = UNet2DModel(**tiny_config()).eval()
    stock.save_pretrained(tmp_path / "stock")
    model = DIAUNet2DModel.from_pretrained(tmp_path / "stock", dia_sharing="per_block").eval()
    assert not any(parameter.is_meta for parameter in model.parameters())
    assert model.config.dia_sharing == "per_block"
    sample, timestep = inputs()
    with torch.no_grad():
        assert (model(sample, timestep).sample - stock(sample, timestep).sample).abs().max() <= 1e-6


def test_save_and_load_round_trip(tmp_path):
    model = build(dia_sharing="per_width").eval()
    model.save_pretrained(tmp_path)
    loaded = DIAUNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.dia_sharing == "per_width"
    sample, timestep = inputs()
    with torch.no_grad():
        assert (loaded(sample, timestep).sample - model(sample, timestep).sample).abs().max() <= 5e-5
    with pytest.raises(ValueError, match="dia_gate"):
        DIAUNet2DModel.from_pretrained(tmp_path, dia_gate="identity")


LOAD_IN_FRESH_PROCESS = """
import sys, torch
{load}
torch.manual_seed(0)
sample = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    output = {call}
torch.save(output, sys.argv[2])
"""


def run_fresh_python(code: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    model = build().eval()
    model.save_pretrained(tmp_path / "model")
    code = LOAD_IN_FRESH_PROCESS.format(
        load="from dia_diffusion import DIAUNet2DModel\nmodel = DIAUNet2DModel.from_pretrained(sys.argv[1]).eval()",
        call="model(sample, torch.tensor([3, 700])).sample",
    )
    run_fresh_python(code, str(tmp_path / "model"), str(tmp_path / "out.pt"))
    torch.manual_seed(0)
    sample = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(sample, torch.tensor([3, 700])).sample
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 5e-5


def test_stock_pipelines_sample_with_the_model():
    model = build().eval()
    for pipeline_class, scheduler in ((DDPMPipeline, DDPMScheduler()), (DDIMPipeline, DDIMScheduler())):
        pipeline = pipeline_class(unet=model, scheduler=scheduler)
        images = pipeline(
            batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np"
        ).images
        assert images.shape == (2, 16, 16, 3)
        assert ((images >= 0) & (images <= 1)).all()


def test_saved_pipeline_loads_in_a_fresh_process_after_importing_the_package(tmp_path):
    model = build().eval()
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        tmp_path / "pipe"
    )
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["dia_diffusion", "DIAUNet2DModel"]
    # Pipelines saved by earlier releases name the module the class was defined in then.
    shutil.copytree(tmp_path / "pipe", tmp_path / "earlier")
    index["unet"] = ["dia_diffusion.unet_dia", "DIAUNet2DModel"]
    (tmp_path / "earlier" / "model_index.json").write_text(json.dumps(index))
    code = LOAD_IN_FRESH_PROCESS.format(
        load="import dia_diffusion\nfrom diffusers import DDPMPipeline\n"
        "pipes = [DDPMPipeline.from_pretrained(folder) for folder in sys.argv[1].split(',')]\n"
        "assert [type(pipe.unet).__name__ for pipe in pipes] == ['DIAUNet2DModel'] * 2, pipes",
        call="[pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type='pt').images "
        "for pipe in pipes]",
    )
    run_fresh_python(code, f"{tmp_path / 'pipe'},{tmp_path / 'earlier'}", str(tmp_path / "images.pt"))
    images, earlier_images = torch.load(tmp_path / "images.pt")
    assert images.shape == (1, 3, 16, 16) and torch.equal(images, earlier_images)


def loss_and_gradients(model: DIAUNet2DModel):
    sample, timestep = inputs(batch=4)
    loss = model(sample, timestep).sample.square().mean()
    model.zero_grad()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "options",
    [{}, dict(dia_condition="timestep"), dict(dia_global_cell="widest", dia_condition="timestep")],
    ids=str,
)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(options):
    model = build(**ALL_BLOCKS_CONFIG, **options)
    if options:
        # The time-embedding projection starts at zero; make it take part in the computation.
        torch.nn.init.normal_(model.channel_attention.condition_projection.weight)
    loss, gradients = loss_and_gradients(model)
    model.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model)
    assert torch.allclose(loss, checkpointed_loss, rtol=0, atol=1e-7)
    for name, grad in gradients.items():
        assert torch.allclose(grad, checkpointed_gradients[name], rtol=1e-5, atol=1e-7), name


def test_bf16_autocast_forward_and_backward():
    model = build()
    sample, timestep = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(sample, timestep).sample
    assert output.dtype == torch.bfloat16
    output.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("options", [{}, dict(dia_global_cell="widest", dia_condition="timestep")], ids=str)
def test_torch_compile_full_graph_has_no_graph_breaks(options):
    model = build(**options)
    sample, timestep = inputs()
    eager = model(sample, timestep).sample
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    output = compiled(sample, timestep).sample
    output.square().mean().backward()
    assert torch.allclose(output, eager, atol=1e-5)


def test_deepcopy_gives_an_independent_model():
    model = build().eval()
    clone = copy.deepcopy(model)
    sample, timestep = inputs()
    with torch.no_grad():
        before = model(sample, timestep).sample
        for parameter in clone.channel_attention.parameters():
            parameter.add_(1.0)
        assert torch.equal(model(sample, timestep).sample, before)
        assert not torch.equal(clone(sample, timestep).sample, before)


@pytest.mark.parametrize("attention", ["dia_lstm", "se_per_layer"])
def test_samples_in_a_batch_are_independent(attention):
    model = build(dia_attention=attention).eval()
    sample, timestep = inputs(batch=3)
    changed = sample.clone()
    changed[1] = torch.randn_like(changed[1])
    with torch.no_grad():
        original, perturbed = model(sample, timestep).sample, model(changed, timestep).sample
    assert torch.equal(original[0], perturbed[0]) and torch.equal(original[2], perturbed[2])
    assert not torch.equal(original[1], perturbed[1])


@pytest.mark.parametrize(
    "attention,sharing,gate", list(itertools.product(ATTENTION_KINDS, SHARING_MODES, GATES))
)
def test_every_option_combination_builds_and_runs(attention, sharing, gate):
    model = build(dia_attention=attention, dia_sharing=sharing, dia_gate=gate).eval()
    sample, timestep = inputs()
    with torch.no_grad():
        output = model(sample, timestep).sample
    assert output.shape == sample.shape and torch.isfinite(output).all()
    assert (model.channel_attention is None) == (attention == "none")


@pytest.mark.parametrize(
    "argument,value",
    [
        ("dia_attention", "transformer"),
        ("dia_sharing", "per_layer"),
        ("dia_reduction", 0),
        ("dia_reduction", 2.5),
        ("dia_hidden_channels", -8),
        ("dia_hidden_channels", 2.5),
        ("dia_gate", "tanh"),
    ],
)
def test_invalid_dia_argument_is_refused_by_name(argument, value):
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        build(**{argument: value})


def test_the_smallest_valid_dia_arguments_are_accepted():
    assert build(dia_reduction=1).channel_attention.cells["shared"].input_map[0].out_features == 16
    assert build(dia_hidden_channels=1).channel_attention.cells["shared"].channels == 1


@pytest.mark.parametrize("attention", ["dia_lstm", "se_shared"])
def test_hidden_channels_only_applies_to_the_global_module(attention):
    assert (
        build(dia_attention=attention, dia_hidden_channels=24).channel_attention.cells["shared"].channels
        == 24
    )
    with pytest.raises(ValueError, match="^dia_hidden_channels shapes the globally shared module"):
        build(dia_attention=attention, dia_hidden_channels=24, dia_sharing="per_width")


def test_a_block_not_built_from_resnet_block_2d_is_refused_by_name():
    # KDownBlock2D's resnets are ResnetBlockCondNorm2D: their normalisation is conditioned, with no branch to gate.
    with pytest.raises(
        ValueError,
        match="^block type KDownBlock2D is not supported by DIAUNet2DModel: DIA needs blocks built from "
        "ResnetBlock2D, it has ResnetBlockCondNorm2D$",
    ):
        build(
            down_block_types=("KDownBlock2D", "DownBlock2D"),
            block_out_channels=(32, 32),
            norm_num_groups=32,
            attention_head_dim=8,
        )


def test_an_unsupported_time_scale_shift_is_refused_by_name():
    with pytest.raises(ValueError, match="^resnet_time_scale_shift must be 'default' or 'scale_shift'"):
        build(resnet_time_scale_shift="spatial")


@pytest.mark.parametrize(
    "attention,sharing", [("dia_lstm", "global"), ("dia_lstm", "per_width"), ("se_shared", "global")]
)
def test_shared_dia_parameter_count_does_not_depend_on_depth(attention, sharing):
    counts = []
    for layers in (1, 3):
        model = build(dia_attention=attention, dia_sharing=sharing, layers_per_block=layers)
        counts.append(count_parameters(model.channel_attention))
    assert counts[0] == counts[1] > 0


def test_default_dia_adds_at_most_one_percent_to_the_ddpm_cifar10_unet():
    rows = {row["variant"]: row for row in parameter_counts(preset_unet_config("cifar10-ddpm"))}
    assert rows["stock"]["parameters"] == pytest.approx(35.7e6, rel=0.01)
    assert 0 < rows["dia_lstm/global"]["added_percent"] <= 1.0


def test_params_command_prints_stock_and_dia_counts(capsys, tmp_path):
    assert cli_main(["params", "--preset", "cifar10-ddpm", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["variant"] == "stock"
    assert {row["variant"] for row in rows} >= {"dia_lstm/global", "se_per_layer"}
    UNet2DModel(**tiny_config()).save_pretrained(tmp_path / "model")
    assert cli_main(["params", "--config", str(tmp_path / "model"), "--json"]) == 0
    tiny_rows = json.loads(capsys.readouterr().out)
    assert tiny_rows[0]["parameters"] == count_parameters(UNet2DModel(**tiny_config()))


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "is not a JSON file"), ("[1, 2]", "holds a JSON list"), ('{"blocks": 3}', "unknown keys: blocks")],
)
def test_params_names_a_config_that_is_not_a_unet_config(capsys, tmp_path, content, message):
    config = tmp_path / "config.json"
    config.write_text(content)
    assert cli_main(["params", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(config) in error and message in error
