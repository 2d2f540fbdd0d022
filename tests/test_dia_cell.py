"""The recurrent cells against the paper's formulas, written out by hand in dia_reference.py."""

import pytest
import torch
from dia_reference import randomised, reference_bottleneck, reference_dia_lstm_step

from dia_diffusion.models.dia_cell import DIALSTMCell, SqueezeExciteCell

CHANNELS = 8


def random_inputs(batch: int = 5, channels: int = CHANNELS, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pooled, hidden, memory = torch.randn(3, batch, channels, generator=generator, dtype=torch.float64)
    return pooled, torch.sigmoid(hidden), memory


def test_dia_lstm_step_matches_the_hand_written_cell_with_a_carried_state():
    cell = randomised(DIALSTMCell(CHANNELS, reduction=2))
    pooled, hidden, memory = random_inputs()
    attention, (new_hidden, new_memory) = cell(pooled, (hidden, memory))
    expected_hidden, expected_memory = reference_dia_lstm_step(cell, pooled, hidden, memory)
    torch.testing.assert_close(new_memory, expected_memory, rtol=0, atol=1e-12)
    torch.testing.assert_close(new_hidden, expected_hidden, rtol=0, atol=1e-12)
    # The hidden state IS the attention (no extra head).
    assert torch.equal(attention, new_hidden)


def test_the_zero_state_of_the_first_layer_is_an_explicit_zero_state():
    cell = randomised(DIALSTMCell(CHANNELS, reduction=2))
    pooled, _, _ = random_inputs()
    zeros = torch.zeros_like(pooled)
    attention, (hidden, memory) = cell(pooled, None)
    expected_hidden, expected_memory = reference_dia_lstm_step(cell, pooled, zeros, zeros)
    torch.testing.assert_close(memory, expected_memory, rtol=0, atol=1e-12)
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=1e-12)


def test_a_single_layer_cell_has_no_hidden_map():
    cell = randomised(DIALSTMCell(CHANNELS, reduction=2, recurrent=False))
    assert cell.hidden_map is None
    pooled, _, _ = random_inputs()
    zeros = torch.zeros_like(pooled)
    attention, _ = cell(pooled, None)
    expected, _ = reference_dia_lstm_step(cell, pooled, zeros, zeros)
    torch.testing.assert_close(attention, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell_class", [DIALSTMCell, SqueezeExciteCell])
def test_attention_lies_strictly_inside_zero_one(cell_class):
    cell = randomised(cell_class(CHANNELS, reduction=2))
    pooled, hidden, memory = random_inputs(batch=64)
    state = (hidden, memory) if cell_class is DIALSTMCell else None
    attention, _ = cell(pooled, state)
    assert attention.shape == pooled.shape
    assert (attention > 0).all() and (attention < 1).all()
    # Not a constant: the attention spans a good part of the interval.
    assert attention.min() < 0.2 and attention.max() > 0.6


def test_squeeze_excite_cell_matches_its_formula_and_passes_the_state_through():
    cell = randomised(SqueezeExciteCell(CHANNELS, reduction=2))
    pooled, _, _ = random_inputs()
    state = object()
    attention, returned_state = cell(pooled, state)
    expected = torch.sigmoid(reference_bottleneck(pooled, cell.excite[0], cell.excite[2]))
    torch.testing.assert_close(attention, expected, rtol=0, atol=1e-12)
    assert returned_state is state


@pytest.mark.parametrize(
    "channels,reduction,hidden", [(8, None, 2), (8, 2, 4), (12, 4, 3), (3, 4, 1), (4, 4, 1), (8, 3, 2)]
)
def test_bottleneck_width_is_channels_over_reduction_and_at_least_one(channels, reduction, hidden):
    options = {} if reduction is None else {"reduction": reduction}  # None: the default, r = 4
    lstm, squeeze_excite = DIALSTMCell(channels, **options), SqueezeExciteCell(channels, **options)
    assert lstm.channels == squeeze_excite.channels == channels
    for squeeze, expand, outputs in (
        (*lstm.input_map[::2], 4 * channels),
        (*lstm.hidden_map[::2], 4 * channels),
        (*squeeze_excite.excite[::2], channels),
    ):
        assert (squeeze.in_features, squeeze.out_features) == (channels, hidden)
        assert (expand.in_features, expand.out_features) == (hidden, outputs)


def test_dia_lstm_parameter_count_is_the_papers_formula():
    # Two bottlenecks C -> C/r -> 4C with biases: 10 C^2 / r + 2 C / r + 8 C.
    channels, reduction = 16, 4
    cell = DIALSTMCell(channels, reduction)
    count = sum(parameter.numel() for parameter in cell.parameters())
    assert count == 10 * channels**2 // reduction + 2 * channels // reduction + 8 * channels
