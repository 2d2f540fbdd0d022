"""How the DIA state travels through the UNet: every resnet once, in forward order; from a resnet to the later
resnets that share its cell, across blocks, and to no other; from zero at every call; re-run, not skipped, by
gradient checkpointing; and a gradient for every parameter of every variant."""

import pytest
import torch
from conftest import ALL_BLOCKS_CONFIG, TINY_GREY_UNET, inputs, tiny_config
from diffusers import UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.models.channel_attention import ATTENTION_KINDS, GATES, SHARING_MODES
from dia_diffusion.models.dia_resnet import DIAResnetBlock2D

# (block, width) of each resnet in forward order: down 0, down 1, mid, up 0, up 1.
GREY_SITES = [(0, 8), (1, 16), (2, 16), (2, 16), (3, 16), (3, 16), (4, 8), (4, 8)]
SITE_ORDERS = {
    "grey": (TINY_GREY_UNET, GREY_SITES),
    # Resnet down- and upsamplers are sites too; the mid block's resnets come between down and up.
    "all_blocks": (
        ALL_BLOCKS_CONFIG,
        [(0, 16), (0, 16), (1, 24), (1, 24), (2, 32), (3, 32), (3, 32)]
        + [(4, 32), (4, 32), (5, 24), (5, 24), (5, 24), (6, 16), (6, 16)],
    ),
    "no_mid_block": (
        tiny_config(mid_block_type=None),
        [(0, 16), (1, 32), (2, 32), (2, 32), (3, 16), (3, 16)],
    ),
}
DIA_KINDS = [kind for kind in ATTENTION_KINDS if kind != "none"]


def build(seed: int = 0, config: dict = TINY_GREY_UNET, **dia_options) -> DIAUNet2DModel:
    torch.manual_seed(seed)
    return DIAUNet2DModel(**config, **dia_options)


def grey_inputs(batch: int = 2, seed: int = 0):
    return inputs(batch=batch, size=8, seed=seed, channels=1)


@pytest.mark.parametrize("layout", SITE_ORDERS)
def test_every_resnet_runs_once_in_forward_order_with_its_own_site(layout, monkeypatch):
    config, expected_sites = SITE_ORDERS[layout]
    model = build(config=config).eval()
    assert [(site.block, site.channels) for site in model.resnet_sites] == expected_sites
    visited = []
    run = DIAResnetBlock2D.dia_step

    def recording(resnet, *args, **kwargs):
        visited.append((resnet, resnet.dia_site))
        return run(resnet, *args, **kwargs)

    monkeypatch.setattr(DIAResnetBlock2D, "dia_step", recording)
    sample, timestep = inputs(size=config["sample_size"], channels=config["in_channels"])
    with torch.no_grad():
        model(sample, timestep)
    resnets = [resnet for _, resnet in model.resnets_in_order()]
    assert visited == list(zip(resnets, range(len(expected_sites))))
    assert [resnet.out_channels for resnet in resnets] == [width for _, width in expected_sites]


def attention_per_site(model: DIAUNet2DModel, monkeypatch, perturbed_site: int | None = None):
    """The attention every site computed in one call; optionally what `perturbed_site`'s attention sees is shifted.

    Built with the identity gate at zero gain, the model's output does not depend on its attention at all, so the
    shift can reach a later site only through the recurrent state."""
    computed = {}
    compute = model.channel_attention.attention

    def recording(branch, site, *args, **kwargs):
        if site == perturbed_site:
            branch = branch + torch.linspace(-1, 1, branch.shape[1])[None, :, None, None]
        attention, state = compute(branch, site, *args, **kwargs)
        computed[site] = attention
        return attention, state

    monkeypatch.setattr(model.channel_attention, "attention", recording)
    with torch.no_grad():
        output = model(*grey_inputs()).sample
    monkeypatch.undo()
    return output, computed


@pytest.mark.parametrize(
    "attention,sharing,perturbed,reached",
    [
        # One cell for the whole UNet: a down resnet's state reaches every later resnet, in every block.
        ("dia_lstm", "global", 0, {1, 2, 3, 4, 5, 6, 7}),
        ("dia_lstm", "global", 4, {5, 6, 7}),
        # One cell per width: the 8-wide down resnet reaches the 8-wide up resnets, not the 16-wide ones.
        ("dia_lstm", "per_width", 0, {6, 7}),
        ("dia_lstm", "per_width", 1, {2, 3, 4, 5}),
        # One cell per block: the state restarts at every block.
        ("dia_lstm", "per_block", 0, set()),
        ("dia_lstm", "per_block", 1, set()),
        ("dia_lstm", "per_block", 2, {3}),
        ("dia_lstm", "per_block", 4, {5}),
        # No memory, no state.
        ("se_shared", "global", 0, set()),
        ("se_per_layer", "global", 0, set()),
    ],
)
def test_the_state_reaches_exactly_the_later_resnets_that_share_the_cell(
    attention, sharing, perturbed, reached, monkeypatch
):
    model = build(dia_attention=attention, dia_sharing=sharing, dia_gate="identity").eval()
    output, clean = attention_per_site(model, monkeypatch)
    perturbed_output, shifted = attention_per_site(model, monkeypatch, perturbed)
    assert torch.equal(perturbed_output, output), (
        "the identity gate at zero gain must hold the data path fixed"
    )
    assert sorted(clean) == sorted(shifted) == list(range(len(GREY_SITES)))
    assert not torch.equal(shifted[perturbed], clean[perturbed])
    changed = {site for site in clean if site != perturbed and not torch.equal(shifted[site], clean[site])}
    assert changed == reached


@pytest.mark.parametrize("sharing", SHARING_MODES)
def test_the_state_starts_from_zero_at_every_call(sharing):
    model = build(dia_sharing=sharing).eval()
    first, second = grey_inputs(seed=1), grey_inputs(seed=2)
    with torch.no_grad():
        fresh = model(*second).sample
        model(*first)
        after_another_call = model(*second).sample
        again = model(*second).sample
    assert torch.equal(after_another_call, fresh) and torch.equal(again, fresh)


def count_resnet_runs(model: DIAUNet2DModel, monkeypatch) -> dict:
    """Counts the resnet executions of a forward and of the backward that follows it."""
    counts = {"forward": 0, "backward": 0, "checkpointed": 0}
    phase = "forward"
    run = DIAResnetBlock2D.dia_step

    def counting(*args, **kwargs):
        counts[phase] += 1
        return run(*args, **kwargs)

    monkeypatch.setattr(DIAResnetBlock2D, "dia_step", counting)
    count_checkpoint_calls(model, monkeypatch, counts)
    loss = model(*grey_inputs()).sample.square().mean()
    phase = "backward"
    loss.backward()
    monkeypatch.undo()
    return counts


def count_checkpoint_calls(model: DIAUNet2DModel, monkeypatch, counts: dict) -> None:
    """Counts, in `counts["checkpointed"]`, the calls of the checkpoint function of every DIA resnet that has one."""
    for _, resnet in model.resnets_in_order():
        checkpoint = resnet.dia_checkpoint
        if checkpoint is None:
            continue

        def counting_checkpoint(*args, checkpoint=checkpoint, **kwargs):
            counts["checkpointed"] += 1
            return checkpoint(*args, **kwargs)

        monkeypatch.setattr(resnet, "dia_checkpoint", counting_checkpoint)


def test_gradient_checkpointing_re_runs_every_resnet_during_backward(monkeypatch):
    sites = len(GREY_SITES)
    model = build()
    assert count_resnet_runs(model, monkeypatch) == {"forward": sites, "backward": 0, "checkpointed": 0}
    model.enable_gradient_checkpointing()
    assert count_resnet_runs(model, monkeypatch) == {
        "forward": sites,
        "backward": sites,
        "checkpointed": sites,
    }


def test_gradient_checkpointing_is_skipped_without_gradients(monkeypatch):
    model = build()
    model.enable_gradient_checkpointing()
    counts = {"checkpointed": 0}
    count_checkpoint_calls(model, monkeypatch, counts)
    with torch.no_grad():
        model(*grey_inputs())
    assert counts == {"checkpointed": 0}
    model(*grey_inputs())
    assert counts == {"checkpointed": len(GREY_SITES)}


def nonzero_gradients(model: torch.nn.Module) -> dict[str, bool]:
    sample, timestep = inputs(batch=4)
    model.zero_grad()
    model(sample, timestep).sample.square().mean().backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize(
    "attention,sharing", [(kind, sharing) for kind in DIA_KINDS for sharing in SHARING_MODES]
)
def test_every_parameter_receives_a_gradient(attention, sharing, gate):
    # r = 2: at these tiny widths an r = 4 bottleneck has so few units that all of them can start dead for every sample.
    model = build(
        config=ALL_BLOCKS_CONFIG, dia_attention=attention, dia_sharing=sharing, dia_reduction=2, dia_gate=gate
    )
    if gate == "identity":
        with torch.no_grad():
            for gain in model.channel_attention.gains.values():
                gain.fill_(0.5)
    gradients = nonzero_gradients(model)
    assert [name for name, nonzero in gradients.items() if not nonzero] == []
    # The hidden-to-hidden maps only receive a gradient if the state really flows from resnet to resnet.
    assert any("hidden_map" in name for name in gradients) == (attention == "dia_lstm")


@pytest.mark.parametrize("sharing", SHARING_MODES)
def test_a_retrofit_trains_its_gains_first_then_the_whole_dia_module(sharing):
    torch.manual_seed(0)
    model = DIAUNet2DModel.from_unet(UNet2DModel(**ALL_BLOCKS_CONFIG), dia_sharing=sharing, dia_reduction=2)
    gains = {f"channel_attention.gains.{key}" for key in model.channel_attention.gains}
    dia = {name for name, _ in model.named_parameters() if name.startswith("channel_attention.")}
    assert gains and all(model.get_parameter(name).requires_grad for name in gains)
    # At zero gain the attention does not touch the output: only the gains can learn, and they do.
    gradients = nonzero_gradients(model)
    assert {name for name in dia if gradients[name]} == gains
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(model.get_parameter(name).abs().sum() > 0 for name in gains)
    # Once the gains moved, every DIA parameter learns.
    gradients = nonzero_gradients(model)
    assert [name for name in sorted(dia) if not gradients[name]] == []
