"""Exactness where it is exact: `dia_attention="none"` IS the stock UNet2DModel, and a retrofit (`from_unet`, identity
gate at zero gain) computes exactly what the stock UNet it came from computes, bit for bit."""

import pytest
import torch
from conftest import ALL_BLOCKS_CONFIG, inputs, tiny_config
from diffusers import UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.commands.params import count_parameters
from dia_diffusion.models.channel_attention import SHARING_MODES

# Layouts and every code path of the stock forward that DIAUNet2DModel.forward re-implements.
LAYOUTS = {
    "all_blocks": ALL_BLOCKS_CONFIG,
    # Skip blocks (score-SDE's layout) hold a resnet down/upsampler of their own; any block built from
    # ResnetBlock2D is supported.
    "skip_blocks": tiny_config(
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        time_embedding_type="fourier",
        block_out_channels=(32, 32),
        norm_num_groups=32,
    ),
    "cross_attention_mid_block": tiny_config(mid_block_type="UNetMidBlock2DCrossAttn"),
    "no_mid_block": tiny_config(mid_block_type=None),
    "centered_fourier": tiny_config(center_input_sample=True, time_embedding_type="fourier"),
    "class_embedding": tiny_config(num_class_embeds=10),
    "timestep_class_embedding": tiny_config(class_embed_type="timestep"),
    "identity_class_embedding": tiny_config(class_embed_type="identity"),
    "learned_time_scaled_mid": tiny_config(
        time_embedding_type="learned", num_train_timesteps=1000, mid_block_scale_factor=2.0
    ),
}
CLASS_LABELS = {
    "class_embedding": torch.tensor([3, 7]),
    "timestep_class_embedding": torch.tensor([10, 900]),
    # An embedding given as is: float32 whatever the model's dtype (time embedding width = 4 x 16).
    "identity_class_embedding": torch.randn(2, 64, generator=torch.Generator().manual_seed(0)),
}
TIMESTEPS = {
    "per_image": torch.tensor([3, 700]),
    "one_for_all": torch.tensor([250]),
    "scalar_tensor": torch.tensor(250),
    "int": 250,
    "float": 250.7,  # the stock model truncates a Python number to a long
}


def stock_and_twin(layout: str, dtype: torch.dtype = torch.float32) -> tuple[UNet2DModel, UNet2DModel]:
    torch.manual_seed(0)
    stock = UNet2DModel(**LAYOUTS[layout]).to(dtype).eval()
    twin = DIAUNet2DModel(**LAYOUTS[layout], dia_attention="none").to(dtype).eval()
    twin.load_state_dict(stock.state_dict())
    return stock, twin


def both_outputs(
    first: UNet2DModel, second: UNet2DModel, layout: str, timestep, dtype=torch.float32, batch=2
):
    sample, _ = inputs(batch)
    sample = sample.to(dtype)
    with torch.no_grad():
        return [model(sample, timestep, CLASS_LABELS.get(layout)).sample for model in (first, second)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_none_attention_is_the_stock_unet_exactly(layout):
    stock, twin = stock_and_twin(layout)
    expected, output = both_outputs(stock, twin, layout, torch.tensor([3, 700]))
    assert torch.equal(output, expected)


def test_none_attention_is_the_stock_unet_exactly_in_bfloat16():
    stock, twin = stock_and_twin("identity_class_embedding", torch.bfloat16)
    expected, output = both_outputs(
        stock, twin, "identity_class_embedding", torch.tensor([3, 700]), torch.bfloat16
    )
    assert output.dtype == torch.bfloat16 and torch.equal(output, expected)


def test_none_attention_is_the_stock_unet_exactly_for_a_batch_of_64():
    # From 64 images on, a resnet upsampler makes its inputs contiguous first (a diffusers workaround).
    stock, twin = stock_and_twin("all_blocks")
    expected, output = both_outputs(stock, twin, "all_blocks", torch.tensor(250), batch=64)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("timestep", TIMESTEPS.values(), ids=list(TIMESTEPS))
def test_none_attention_takes_every_timestep_form_the_stock_unet_takes(timestep):
    stock, twin = stock_and_twin("class_embedding")
    expected, output = both_outputs(stock, twin, "class_embedding", timestep)
    assert torch.equal(output, expected)
    sample, _ = inputs()
    with torch.no_grad():
        as_tuple = twin(sample, timestep, CLASS_LABELS["class_embedding"], return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], expected)


@pytest.mark.parametrize(
    "layout,class_labels,message",
    [
        ("class_embedding", None, "^class_labels should be provided when doing class conditioning$"),
        (
            "all_blocks",
            torch.tensor([1, 2]),
            "^class_embedding needs to be initialized in order to use class conditioning$",
        ),
    ],
)
def test_class_label_errors_are_the_stock_errors(layout, class_labels, message):
    stock, twin = stock_and_twin(layout)
    sample, timestep = inputs()
    for model in (stock, twin):
        with pytest.raises(ValueError, match=message):
            model(sample, timestep, class_labels)


@pytest.mark.parametrize("sharing", SHARING_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_retrofit_computes_exactly_what_the_stock_unet_computes(layout, sharing):
    torch.manual_seed(0)
    stock = UNet2DModel(**LAYOUTS[layout]).eval()
    retrofit = DIAUNet2DModel.from_unet(stock, dia_sharing=sharing).eval()
    assert retrofit.config.dia_gate == "identity" and retrofit.config.dia_sharing == sharing
    assert count_parameters(retrofit) > count_parameters(stock)
    expected, output = both_outputs(stock, retrofit, layout, torch.tensor([3, 700]))
    assert torch.equal(output, expected)


def test_a_retrofit_keeps_the_stock_unets_dtype():
    torch.manual_seed(0)
    stock = UNet2DModel(**ALL_BLOCKS_CONFIG).double().eval()
    retrofit = DIAUNet2DModel.from_unet(stock).eval()
    assert all(parameter.dtype == torch.float64 for parameter in retrofit.parameters())
    expected, output = both_outputs(stock, retrofit, "all_blocks", torch.tensor([3, 700]), torch.float64)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("unet_class", [UNet2DModel, DIAUNet2DModel])
def test_from_pretrained_loads_a_pipelines_unet_subfolder_exactly(unet_class, tmp_path):
    # A stock checkpoint is retrofitted on the way in; a DIA checkpoint is loaded as it was saved.
    torch.manual_seed(0)
    saved = unet_class(**ALL_BLOCKS_CONFIG).eval()
    saved.save_pretrained(tmp_path / "unet")
    loaded = DIAUNet2DModel.from_pretrained(tmp_path, subfolder="unet").eval()
    assert type(loaded) is DIAUNet2DModel
    expected, output = both_outputs(saved, loaded, "all_blocks", torch.tensor([3, 700]))
    assert torch.equal(output, expected)


def test_a_retrofit_refuses_a_dia_unet():
    with pytest.raises(
        ValueError, match="^from_unet expects a stock UNet2DModel; this model already has DIA$"
    ):
        DIAUNet2DModel.from_unet(DIAUNet2DModel(**tiny_config()))


def test_a_retrofit_refuses_an_unknown_dia_option_by_name():
    with pytest.raises(ValueError, match=r"^unknown DIA option\(s\) \['dia_sharring'\]; expected some of \("):
        DIAUNet2DModel.from_unet(UNet2DModel(**tiny_config()), dia_sharring="global")


@pytest.mark.parametrize("fault", ["extra_key", "missing_key"])
def test_a_retrofit_whose_weights_do_not_line_up_key_for_key_is_refused(fault, monkeypatch):
    torch.manual_seed(0)
    stock = UNet2DModel(**tiny_config())
    weights = stock.state_dict()
    if fault == "extra_key":
        weights["conv_in.scale"] = torch.ones(1)
        match = r"stock keys not used \['conv_in.scale'\], keys left uninitialised \[\]"
    else:
        del weights["conv_out.bias"]
        match = r"stock keys not used \[\], keys left uninitialised \['conv_out.bias'\]"
    monkeypatch.setattr(stock, "state_dict", lambda: weights)
    with pytest.raises(RuntimeError, match=match):
        DIAUNet2DModel.from_unet(stock)
