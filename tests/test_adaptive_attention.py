"""The attention options that let one shared module follow the noise level and keep every level's width:
`dia_condition="timestep"` and `dia_global_cell="widest"`, checked against hand-written maths and for the
guarantees every DIA option keeps (retrofit parity, checkpointing, compile, gradients, parameter budget)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_BLOCKS_CONFIG, inputs, tiny_config
from diffusers import UNet2DModel
from test_unet_dia import build, loss_and_gradients

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.params import count_parameters, parameter_counts, preset_unet_config
from dia_diffusion.models.channel_attention import ChannelAttention, ResnetSite

# Every new option, alone and combined, on the sharing modes it applies to.
NEW_OPTIONS = [
    dict(dia_condition="timestep"),
    dict(dia_global_cell="widest"),
    dict(dia_global_cell="widest", dia_condition="timestep"),
    dict(dia_global_cell="widest", dia_attention="se_shared"),
    dict(dia_sharing="per_width", dia_condition="timestep"),
    dict(dia_sharing="per_block", dia_condition="timestep"),
    dict(dia_attention="se_per_layer", dia_condition="timestep"),
]
SITES = [ResnetSite(0, 4), ResnetSite(0, 4), ResnetSite(1, 6), ResnetSite(2, 6), ResnetSite(3, 4)]


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero values everywhere, so that zero-initialised parts (projection, gains) take part in the maths."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def branch(channels: int, seed: int) -> torch.Tensor:
    return torch.randn(3, channels, 5, 5, generator=torch.Generator().manual_seed(seed))


def test_widest_cell_runs_at_the_widest_width_and_slices_its_own_sigmoid_output():
    module = ChannelAttention(SITES, "dia_lstm", "global", reduction=2, global_cell="widest")
    randomise(module)
    cell = module.cells["shared"]
    assert cell.channels == 6 and set(module.input_adapters) == {"width4"}
    assert not hasattr(module, "output_adapters")
    narrow, wide = branch(4, 0), branch(6, 1)
    # Site 0 (width 4): adapter 4 -> 6, the cell from a zero state, the first 4 channels of h'.
    expected_h, expected_state = cell(module.input_adapters["width4"](narrow.mean(dim=(2, 3))), None)
    attention, state = module.attention(narrow, 0, None)
    assert torch.equal(attention, expected_h[:, :4])
    assert torch.equal(state[0], expected_state[0]) and torch.equal(state[1], expected_state[1])
    # Site 2 (width 6): the pooled branch enters the cell as it is, and the whole h' is the attention.
    expected_h, _ = cell(wide.mean(dim=(2, 3)), state)
    assert torch.equal(module.attention(wide, 2, state)[0], expected_h)
    gated, _ = module(wide, 2, state)
    assert torch.equal(gated, wide * expected_h[:, :, None, None])


def test_timestep_condition_is_added_to_the_cell_input_at_every_site():
    module = ChannelAttention(
        SITES, "dia_lstm", "per_width", reduction=2, condition="timestep", condition_channels=7
    )
    randomise(module)
    temb = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    condition = module.project_condition(temb)
    projection = module.condition_projection
    assert torch.allclose(condition, F.silu(temb) @ projection.weight.T + projection.bias)
    assert condition.shape == (3, 6)  # the widest cell's width; narrower cells use its first channels
    narrow = branch(4, 3)
    expected, _ = module.cells["width4"](narrow.mean(dim=(2, 3)) + condition[:, :4], None)
    assert torch.equal(module.attention(narrow, 0, None, condition)[0], expected)
    wide = branch(6, 4)
    expected, _ = module.cells["width6"](wide.mean(dim=(2, 3)) + condition, None)
    assert torch.equal(module.attention(wide, 2, None, condition)[0], expected)


def test_timestep_condition_goes_through_the_bottleneck_cells_adapters_first():
    module = ChannelAttention(
        SITES, "dia_lstm", "global", reduction=2, condition="timestep", condition_channels=7
    )
    randomise(module)
    condition = module.project_condition(torch.randn(3, 7, generator=torch.Generator().manual_seed(5)))
    wide = branch(6, 6)
    cell_input = module.input_adapters["width6"](wide.mean(dim=(2, 3))) + condition
    hidden, _ = module.cells["shared"](cell_input, None)
    expected = torch.sigmoid(module.output_adapters["width6"](hidden))
    assert torch.equal(module.attention(wide, 2, None, condition)[0], expected)


def test_the_same_branch_gets_different_attention_at_different_noise_levels_only_when_conditioned():
    sites, image = [ResnetSite(0, 6)], branch(6, 7)
    temb_early, temb_late = (torch.randn(3, 7, generator=torch.Generator().manual_seed(s)) for s in (8, 9))
    for condition, differs in (("none", False), ("timestep", True)):
        module = ChannelAttention(sites, "se_shared", reduction=2, condition=condition, condition_channels=7)
        randomise(module)
        early = module.attention(image, 0, None, module.project_condition(temb_early))[0]
        late = module.attention(image, 0, None, module.project_condition(temb_late))[0]
        assert (not torch.equal(early, late)) == differs


def test_timestep_conditioned_model_starts_out_equal_to_the_unconditioned_one():
    # The projection is zero at initialisation and is built after every other DIA parameter, so the same seed gives
    # the same model; only training makes the noise level matter.
    sample, timestep = inputs()
    for options in ({}, {"dia_global_cell": "widest"}, {"dia_sharing": "per_block"}):
        plain = build(**options).eval()
        conditioned = build(**options, dia_condition="timestep").eval()
        assert count_parameters(conditioned) > count_parameters(plain)
        with torch.no_grad():
            assert torch.equal(plain(sample, timestep).sample, conditioned(sample, timestep).sample)


@pytest.mark.parametrize("options", NEW_OPTIONS, ids=str)
def test_retrofit_with_the_identity_gate_is_exact(options):
    torch.manual_seed(0)
    stock = UNet2DModel(**ALL_BLOCKS_CONFIG).eval()
    model = DIAUNet2DModel.from_unet(stock, **options).eval()
    assert model.config.dia_gate == "identity"
    randomise(model.channel_attention.cells)  # whatever the attention computes, zero gains must hide it
    sample, timestep = inputs()
    with torch.no_grad():
        assert torch.equal(model(sample, timestep).sample, stock(sample, timestep).sample)


@pytest.mark.parametrize("options", NEW_OPTIONS, ids=str)
def test_every_new_parameter_receives_a_gradient(options):
    model = build(dia_reduction=2, **{**ALL_BLOCKS_CONFIG, **options})
    _, gradients = loss_and_gradients(model)
    assert [name for name, grad in gradients.items() if grad is None or grad.abs().sum() == 0] == []
    if options.get("dia_condition") == "timestep":
        assert "channel_attention.condition_projection.weight" in gradients


@pytest.mark.parametrize(
    # Per-block cells serve one block each; the per-layer SE is the one-module-per-layer design.
    "options",
    [o for o in NEW_OPTIONS if "dia_attention" not in o and o.get("dia_sharing") != "per_block"],
    ids=str,
)
def test_shared_parameter_count_does_not_depend_on_depth(options):
    counts = [
        count_parameters(build(**options, layers_per_block=layers).channel_attention) for layers in (1, 3)
    ]
    assert counts[0] == counts[1] > 0


def test_new_global_variants_add_at_most_one_percent_to_the_ddpm_cifar10_unet():
    rows = {row["variant"]: row for row in parameter_counts(preset_unet_config("cifar10-ddpm"))}
    for variant in ("dia_lstm/global+timestep", "dia_lstm/global-widest", "dia_lstm/global-widest+timestep"):
        assert 0 < rows[variant]["added_percent"] <= 1.0, variant


def test_saved_options_round_trip(tmp_path):
    model = build(dia_global_cell="widest", dia_condition="timestep").eval()
    randomise(model.channel_attention)
    model.save_pretrained(tmp_path)
    loaded = DIAUNet2DModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.dia_global_cell, loaded.config.dia_condition) == ("widest", "timestep")
    sample, timestep = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(sample, timestep).sample, model(sample, timestep).sample)


@pytest.mark.parametrize(
    "options,named",
    [
        (dict(dia_condition="noise_level"), "dia_condition"),
        (dict(dia_global_cell="narrowest"), "dia_global_cell"),
        (dict(dia_global_cell="widest", dia_sharing="per_width"), "dia_global_cell"),
        (dict(dia_global_cell="widest", dia_attention="se_per_layer"), "dia_global_cell"),
        (dict(dia_global_cell="widest", dia_hidden_channels=8), "dia_hidden_channels"),
        (dict(dia_condition="timestep", dia_attention="none"), "dia_condition"),
    ],
)
def test_contradicting_options_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        DIAUNet2DModel(**tiny_config(**options))
