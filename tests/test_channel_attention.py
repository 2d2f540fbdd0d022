"""ChannelAttention against the method written out by hand: which cell serves which resnet, the pooled input,
the global cell's adapters, and both gates (the paper's `branch * a`; the retrofit's `branch * (1 + g (a - 1/2))`)."""

import re

import pytest
import torch
from dia_reference import affine, randomised, reference_bottleneck, reference_dia_lstm_step

from dia_diffusion.models.channel_attention import (
    ATTENTION_KINDS,
    GATES,
    SHARING_MODES,
    ChannelAttention,
    ResnetSite,
)
from dia_diffusion.models.dia_cell import DIALSTMCell, SqueezeExciteCell

# Five resnets in three blocks: a lone narrow resnet, two wide ones, two narrow ones.
SITES = (ResnetSite(0, 8), ResnetSite(1, 16), ResnetSite(1, 16), ResnetSite(2, 8), ResnetSite(2, 8))
KINDS = [kind for kind in ATTENTION_KINDS if kind != "none"]
# Which cell each site uses; these names are the keys of saved checkpoints.
SITE_CELLS = {
    "global": ("shared",) * 5,
    "per_width": ("width8", "width16", "width16", "width8", "width8"),
    "per_block": ("block0", "block1", "block1", "block2", "block2"),
}
# Per-layer SE is one module per resnet, whatever the sharing mode.
PER_LAYER_CELLS = ("layer0", "layer1", "layer2", "layer3", "layer4")


def build(attention: str, sharing: str, gate: str = "sigmoid", hidden_channels=None, seed: int = 0):
    """A float64 module with every weight drawn at unit scale, and non-zero gains for the identity gate."""
    module = ChannelAttention(
        SITES, attention, sharing, reduction=2, hidden_channels=hidden_channels, gate=gate
    )
    return randomised(module, seed)


def reference_attention(module: ChannelAttention, branch: torch.Tensor, site: int, state):
    """The attention of one site, from its pooled branch and its cell's state, written out by hand."""
    height, width = branch.shape[2:]
    pooled = branch.sum(dim=(2, 3)) / (height * width)  # global average pooling
    width_key = f"width{branch.shape[1]}"
    if module.uses_adapters:
        pooled = affine(pooled, module.input_adapters[width_key])
    cell = module.cells[module.site_cells[site]]
    if isinstance(cell, DIALSTMCell):
        hidden, memory = state if state is not None else (torch.zeros_like(pooled), torch.zeros_like(pooled))
        attention, memory = reference_dia_lstm_step(cell, pooled, hidden, memory)
        state = (attention, memory)
    else:
        attention = torch.sigmoid(reference_bottleneck(pooled, cell.excite[0], cell.excite[2]))
    if module.uses_adapters:
        attention = torch.sigmoid(affine(attention, module.output_adapters[width_key]))
    return attention, state


def random_branch(site: int, batch: int = 3, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + site)
    return torch.randn(batch, SITES[site].channels, 4, 5, generator=generator, dtype=torch.float64)


def random_state(module: ChannelAttention, site: int, batch: int = 3):
    """A non-zero state of the width the site's cell runs at (None for the memoryless SE cells)."""
    cell = module.cells[module.site_cells[site]]
    if not isinstance(cell, DIALSTMCell):
        return None
    generator = torch.Generator().manual_seed(100 + site)
    hidden, memory = torch.randn(2, batch, cell.channels, generator=generator, dtype=torch.float64)
    return torch.sigmoid(hidden), memory


VARIANTS = [(kind, sharing) for kind in KINDS for sharing in SHARING_MODES]
WITHOUT_ADAPTERS = [
    (kind, sharing) for kind, sharing in VARIANTS if kind == "se_per_layer" or sharing != "global"
]


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_each_site_uses_the_cell_its_sharing_mode_names(attention, sharing):
    module = ChannelAttention(SITES, attention, sharing)
    assert module.site_cells == (PER_LAYER_CELLS if attention == "se_per_layer" else SITE_CELLS[sharing])
    assert sorted(module.cells) == sorted(set(module.site_cells))
    assert module.uses_adapters == (sharing == "global" and attention != "se_per_layer")
    cell_class = DIALSTMCell if attention == "dia_lstm" else SqueezeExciteCell
    assert all(type(cell) is cell_class for cell in module.cells.values())


def test_the_defaults_are_one_global_dia_lstm_cell_at_r_4_with_the_papers_gate():
    module = ChannelAttention(SITES)
    assert list(module.cells) == ["shared"] and type(module.cells["shared"]) is DIALSTMCell
    assert module.gate == "sigmoid" and not hasattr(module, "gains")
    assert module.cells["shared"].input_map[0].out_features == 8 // 4


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_every_cell_squeezes_by_the_reduction_it_is_given(attention, sharing):
    module = ChannelAttention(SITES, attention, sharing, reduction=2)
    for cell in module.cells.values():
        squeeze = cell.input_map[0] if isinstance(cell, DIALSTMCell) else cell.excite[0]
        assert squeeze.out_features == cell.channels // 2


@pytest.mark.parametrize("sharing", SHARING_MODES)
def test_a_dia_cell_has_a_hidden_map_exactly_when_several_resnets_share_it(sharing):
    module = ChannelAttention(SITES, "dia_lstm", sharing)
    for key, cell in module.cells.items():
        shared_by = module.site_cells.count(key)
        assert (cell.hidden_map is not None) == (shared_by > 1), key


@pytest.mark.parametrize("hidden_channels,expected", [(None, 8), (12, 12)])
@pytest.mark.parametrize("attention", ["dia_lstm", "se_shared"])
def test_the_global_cell_runs_at_one_width_with_an_adapter_pair_per_width(
    attention, hidden_channels, expected
):
    module = ChannelAttention(SITES, attention, "global", hidden_channels=hidden_channels)
    assert module.cells["shared"].channels == expected  # default: the narrowest width
    for width in (8, 16):
        into, out_of = module.input_adapters[f"width{width}"], module.output_adapters[f"width{width}"]
        assert (into.in_features, into.out_features) == (width, expected)
        assert (out_of.in_features, out_of.out_features) == (expected, width)
    assert sorted(module.input_adapters) == sorted(module.output_adapters) == ["width16", "width8"]


@pytest.mark.parametrize("attention,sharing", WITHOUT_ADAPTERS)
def test_per_cell_modes_run_each_cell_at_its_sites_width_without_adapters(attention, sharing):
    module = ChannelAttention(SITES, attention, sharing)
    assert not hasattr(module, "input_adapters") and not hasattr(module, "output_adapters")
    for key, site in zip(module.site_cells, SITES):
        assert module.cells[key].channels == site.channels


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_identity_gate_has_zero_trainable_gains_per_width_or_per_cell(attention, sharing):
    assert not hasattr(ChannelAttention(SITES, attention, sharing, gate="sigmoid"), "gains")
    module = ChannelAttention(SITES, attention, sharing, gate="identity")
    keys = ("width8", "width16") if module.uses_adapters else module.site_cells
    assert sorted(module.gains) == sorted(set(keys))
    for key, site in zip(module.site_gains, SITES):
        gain = module.gains[key]
        assert gain.requires_grad and gain.shape == (site.channels,) and not gain.any()


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_every_site_matches_the_hand_written_attention_and_gate(attention, sharing, gate):
    module = build(attention, sharing, gate)
    for site in range(len(SITES)):
        branch, state = random_branch(site), random_state(module, site)
        expected_attention, expected_state = reference_attention(module, branch, site, state)
        if gate == "sigmoid":
            expected = branch * expected_attention[:, :, None, None]
        else:
            gain = module.gains[module.site_gains[site]]
            assert (gain.abs() > 0.1).any()
            expected = branch * (1 + gain * (expected_attention - 0.5))[:, :, None, None]
        gated, new_state = module(branch, site, state)
        torch.testing.assert_close(gated, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            module.attention(branch, site, state)[0], expected_attention, rtol=0, atol=1e-12
        )
        if expected_state is None:
            assert new_state is None
        else:
            torch.testing.assert_close(new_state, expected_state, rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_attention_lies_strictly_inside_zero_one_at_every_site(attention, sharing):
    module = build(attention, sharing)
    for site in range(len(SITES)):
        attention_values, _ = module.attention(
            random_branch(site, batch=32), site, random_state(module, site, 32)
        )
        assert (attention_values > 0).all() and (attention_values < 1).all()
        assert attention_values.max() - attention_values.min() > 0.3


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_attention_sees_only_each_channels_spatial_mean(attention, sharing):
    module = build(attention, sharing)
    branch, state = random_branch(1), random_state(module, 1)
    # Shuffle the pixels of every channel independently: each channel keeps its mean.
    flat = branch.flatten(2)
    order = torch.argsort(torch.rand(flat.shape, generator=torch.Generator().manual_seed(0)), dim=2)
    shuffled = torch.gather(flat, 2, order).view_as(branch)
    assert not torch.equal(shuffled, branch)
    before, after = module.attention(branch, 1, state)[0], module.attention(shuffled, 1, state)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    moved = branch.clone()
    moved[:, 3] += 1.0  # one channel's mean moves
    assert not torch.allclose(module.attention(moved, 1, state)[0], before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention,sharing", VARIANTS)
def test_identity_gate_at_zero_gain_returns_the_branch_exactly(attention, sharing):
    module = ChannelAttention(SITES, attention, sharing, gate="identity")
    for site in range(len(SITES)):
        branch = random_branch(site).float()
        gated, _ = module(branch, site, None)
        assert torch.equal(gated, branch)


def test_the_gated_branch_keeps_the_branch_dtype_under_autocast():
    module = ChannelAttention(SITES, "dia_lstm", "global", gate="identity")
    with torch.no_grad():
        module.gains["width8"].fill_(0.5)
    branch = random_branch(0).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gated, _ = module(branch, 0, None)
    assert gated.dtype == torch.bfloat16


@pytest.mark.parametrize("attention", ["none", "transformer"])
def test_an_attention_kind_without_a_module_is_refused_by_name(attention):
    accepted = tuple(kind for kind in ATTENTION_KINDS if kind != "none")
    with pytest.raises(
        ValueError, match=re.escape(f"attention must be one of {accepted}, got {attention!r}")
    ):
        ChannelAttention(SITES, attention)


def test_a_timestep_condition_without_the_time_embedding_width_is_refused():
    message = "condition='timestep' needs condition_channels, the width of the time embedding"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ChannelAttention(SITES, condition="timestep")
    assert (
        ChannelAttention(SITES, condition="timestep", condition_channels=16).condition_projection is not None
    )
