"""A DIAUNet2DModel saved by an earlier release is bitwise the same model today: the same state-dict keys, and
`torch.equal` outputs and input gradients, for every combination of the `dia_*` options
(fixtures: tests/fixtures/make_saved_dia_unets.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dia_diffusion import DIAUNet2DModel

FIXTURES = Path(__file__).parent / "fixtures" / "saved_dia_unets"
INDEX = json.loads((FIXTURES / "index.json").read_text())


@pytest.fixture
def one_thread():
    """The recorded gradients were summed on one thread, as here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("entry", INDEX, ids=[entry["name"] for entry in INDEX])
def test_a_saved_model_loads_with_its_keys_and_gives_its_recorded_output_and_gradient(entry, one_thread):
    folder = FIXTURES / entry["name"]
    model = DIAUNet2DModel.from_pretrained(folder).eval()
    saved_keys = set(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    assert set(model.state_dict()) == saved_keys
    for name, value in entry["options"].items():
        assert model.config[name] == value

    expected = load_file(str(folder / "expected.safetensors"))
    # safetensors leaves the loaded weights at unaligned addresses, and vectorised kernels then sum in another order
    # (an ulp of the gradient); the recorded values came from weights in freshly allocated, aligned memory.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    sample = expected["sample"].clone().requires_grad_(True)
    output = model(sample, expected["timestep"], expected.get("class_labels")).sample
    (output * expected["weights"]).sum().backward()
    assert torch.equal(output.detach(), expected["output"])
    assert torch.equal(sample.grad, expected["input_gradient"])
