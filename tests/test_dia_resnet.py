"""The mechanism that puts DIA inside diffusers' resnets (models/dia_resnet.py): stock module names and keys, exact
gradients under every way of checkpointing, a state that lives for one call only, resnets checked to run in site
order, and copies that are independent models."""

import copy

import pytest
import torch
from conftest import ALL_BLOCKS_CONFIG, inputs, tiny_config
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from tiny_stable_diffusion import SD_UNET

from dia_diffusion import DIAUNet2DConditionModel, DIAUNet2DModel
from dia_diffusion.models.dia_resnet import CheckpointDIAResnetsInside, DIAResnetBlock2D


def build(config: dict = ALL_BLOCKS_CONFIG, seed: int = 0, **dia_options) -> DIAUNet2DModel:
    torch.manual_seed(seed)
    model = DIAUNet2DModel(**config, dia_reduction=2, **dia_options)
    with torch.no_grad():
        for parameter in model.channel_attention.parameters():
            # Zero-initialised projections and gains would keep parts of DIA out of the gradients compared here.
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def reentrant(module, *args):
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=True)


def non_reentrant(module, *args):
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


def gradients_of(model: DIAUNet2DModel, calls: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Input and parameter gradients of the summed loss of `calls` forward calls (on different inputs) followed by
    one backward."""
    model.zero_grad()
    samples = []
    loss = 0
    for call in range(calls):
        sample, timestep = inputs(batch=3, seed=call)
        sample.requires_grad_(True)
        samples.append(sample)
        loss = loss + model(sample, timestep).sample.square().mean()
    loss.backward()
    # A compiled model names its parameters under `_orig_mod.`.
    return torch.cat([sample.grad for sample in samples]), {
        name.removeprefix("_orig_mod."): parameter.grad.clone()
        for name, parameter in model.named_parameters()
    }


def assert_same_gradients(expected, actual) -> None:
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-7)
    assert expected[1].keys() == actual[1].keys()
    for name, gradient in expected[1].items():
        torch.testing.assert_close(actual[1][name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_resnets_keep_their_stock_names_and_keys_and_the_shared_module_is_owned_once():
    torch.manual_seed(0)
    stock = UNet2DModel(**ALL_BLOCKS_CONFIG)
    model = DIAUNet2DModel.from_unet(stock)
    stock_keys, keys = set(stock.state_dict()), set(model.state_dict())
    assert stock_keys <= keys
    assert {key.split(".")[0] for key in keys - stock_keys} == {"channel_attention"}
    resnets = [resnet for _, resnet in model.resnets_in_order()]
    assert resnets and all(type(resnet) is DIAResnetBlock2D for resnet in resnets)
    assert [resnet.dia_site for resnet in resnets] == list(range(len(resnets)))
    # The shared module is reached through the call holder, not registered under any resnet.
    assert all(resnet.dia_call is model.dia_call for resnet in resnets)
    assert model.dia_call.attention is model.channel_attention
    owners = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if module is model.channel_attention
    ]
    assert owners == ["channel_attention"]


def test_without_attention_the_resnets_stay_stock():
    model = DIAUNet2DModel(**ALL_BLOCKS_CONFIG, dia_attention="none")
    assert model.dia_call is None and model.channel_attention is None
    assert all(type(resnet) is ResnetBlock2D for _, resnet in model.resnets_in_order())


@pytest.mark.parametrize(
    "checkpoint", [None, reentrant, non_reentrant], ids=["default", "reentrant", "non_reentrant"]
)
@pytest.mark.parametrize("calls", [1, 2], ids=["one_forward", "two_forwards_one_backward"])
def test_gradient_checkpointing_gives_the_eager_gradients(checkpoint, calls):
    model = build(dia_condition="timestep")
    eager = gradients_of(model, calls)
    model.enable_gradient_checkpointing(checkpoint)
    assert all(resnet.dia_checkpoint is not None for _, resnet in model.resnets_in_order())
    assert_same_gradients(eager, gradients_of(model, calls))
    model.disable_gradient_checkpointing()
    assert all(resnet.dia_checkpoint is None for _, resnet in model.resnets_in_order())
    assert_same_gradients(eager, gradients_of(model, calls))


def test_the_checkpoint_function_wraps_each_resnet_step_once_never_the_resnet_itself():
    model = build()
    wrapped = []

    def counting(function, *args):
        wrapped.append(function)
        return non_reentrant(function, *args)

    model.enable_gradient_checkpointing(counting)
    sample, timestep = inputs()
    model(sample, timestep).sample.mean().backward()
    steps = [resnet.dia_step for _, resnet in model.resnets_in_order()]
    assert wrapped == steps
    wrapped.clear()
    with torch.no_grad():
        model(sample, timestep)
    assert wrapped == []


def test_the_blocks_get_the_chosen_function_wrapped_and_lose_it_when_checkpointing_is_disabled():
    model = build()
    model.enable_gradient_checkpointing(reentrant)
    blocks = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    assert blocks and all(block.gradient_checkpointing for block in blocks)
    functions = [block._gradient_checkpointing_func for block in blocks]
    assert all(isinstance(f, CheckpointDIAResnetsInside) and f.checkpoint is reentrant for f in functions)
    assert model.is_gradient_checkpointing
    model.disable_gradient_checkpointing()
    assert not any(block.gradient_checkpointing for block in blocks) and not model.is_gradient_checkpointing


def test_from_unet_refuses_a_unet_of_the_other_family_by_name():
    torch.manual_seed(0)
    conditional = UNet2DConditionModel(**SD_UNET)
    with pytest.raises(
        ValueError, match="^DIAUNet2DModel.from_unet expects a UNet2DModel, got a UNet2DConditionModel"
    ):
        DIAUNet2DModel.from_unet(conditional)


def test_a_batch_of_64_through_resnet_upsamplers_is_the_stock_computation():
    # diffusers makes tensors contiguous before a resnet's upsampler from a batch of 64 on.
    torch.manual_seed(0)
    stock = UNet2DModel(**ALL_BLOCKS_CONFIG).eval()
    model = DIAUNet2DModel.from_unet(stock).eval()
    sample = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(sample, 10).sample, stock(sample, 10).sample)


def test_a_block_checkpoints_what_is_not_a_dia_resnet_with_the_chosen_function():
    calls = []
    inside = CheckpointDIAResnetsInside(lambda function, *args: calls.append(function) or function(*args))
    model = build()
    resnet = next(resnet for _, resnet in model.resnets_in_order())
    other = torch.nn.Identity()
    tensor = torch.ones(2)
    assert torch.equal(inside(other, tensor), tensor) and calls == [other]
    with pytest.raises(TypeError):
        inside(other, tensor, unexpected=1)  # keywords reach the function
    model.dia_call.reset()
    sample, _ = inputs()
    temb = model.time_embedding(model.time_proj(torch.tensor([1, 2])))
    inside(resnet, model.conv_in(sample), temb=temb)  # as resnet down/upsamplers are called
    assert calls == [other]


def test_compiled_training_with_checkpointing_matches_eager():
    model = build(dia_condition="timestep")
    eager = gradients_of(model)
    model.enable_gradient_checkpointing(non_reentrant)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_gradients(eager, gradients_of(compiled))


def test_the_state_is_dropped_when_a_call_ends():
    model = build()
    sample, timestep = inputs()
    model(sample, timestep)  # with gradients: held states would keep the call's autograd graph alive
    assert model.dia_call.states == {} and model.dia_call.condition is None and model.dia_call.next_site == 0


def test_a_resnet_run_out_of_site_order_is_refused():
    model = build(tiny_config())
    resnets = [resnet for _, resnet in model.resnets_in_order()]
    sample = torch.randn(2, resnets[1].in_channels, 4, 4)
    temb = torch.randn(2, resnets[1].time_emb_proj.in_features)
    model.dia_call.reset()
    with pytest.raises(
        RuntimeError,
        match="^DIA resnet 1 ran when resnet 0 was due: the blocks ran their resnets in an order the DIA sites were "
        "not numbered in$",
    ):
        resnets[1](sample, temb)


def test_a_copy_runs_its_own_attention_with_its_own_state():
    model = build().eval()
    clone = copy.deepcopy(model)
    clone_resnets = [resnet for _, resnet in clone.resnets_in_order()]
    assert all(resnet.dia_call is clone.dia_call for resnet in clone_resnets)
    assert clone.dia_call is not model.dia_call and clone.dia_call.attention is clone.channel_attention
    sample, timestep = inputs()
    with torch.no_grad():
        assert torch.equal(clone(sample, timestep).sample, model(sample, timestep).sample)


def test_a_copy_under_checkpointing_checkpoints_its_own_steps():
    model = build()
    model.enable_gradient_checkpointing(non_reentrant)
    clone = copy.deepcopy(model)
    for _, resnet in clone.resnets_in_order():
        assert resnet.dia_checkpoint is not None
        assert resnet.dia_step.__self__ is resnet
    assert_same_gradients(gradients_of(model), gradients_of(clone))


def test_a_block_without_resnets_is_refused_by_name():
    model = build(tiny_config())
    del model.up_blocks[0].resnets
    with pytest.raises(ValueError, match="^block type AttnUpBlock2D .* it has no resnets$"):
        model.check_dia_blocks()


@pytest.mark.parametrize("attention", ["dia_lstm", "none"])
def test_keyword_arguments_reach_diffusers_forward(attention):
    torch.manual_seed(0)
    unet = DIAUNet2DConditionModel(**SD_UNET, num_class_embeds=3, dia_attention=attention).eval()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        (output,) = unet(sample, 10, text, class_labels=torch.tensor([0, 2]), return_dict=False)
        other_class = unet(sample, 10, text, class_labels=torch.tensor([1, 2])).sample
    assert output.shape == sample.shape
    assert not torch.equal(output[0], other_class[0]) and torch.equal(output[1], other_class[1])
