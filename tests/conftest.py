"""Fixtures shared by several test files."""

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

REPOSITORY = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """A command-line script of the repository (`train/…`, `pipelines/…`) as a fresh module, so that a test calls its
    `main(argv)` in process."""
    spec = importlib.util.spec_from_file_location(Path(relative_path).stem, REPOSITORY / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# An 8x8 grey UNet small enough for sampling and metric tests to run in well under a second.
TINY_GREY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


def save_tiny_pipeline(folder: Path, unet_class: type | None = None, **unet_options) -> Path:
    """A saved DDPMPipeline (100 training timesteps) with a tiny untrained 8x8 grey UNet, stock unless `unet_class`
    says otherwise."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = (unet_class or UNet2DModel)(**TINY_GREY_UNET, **unet_options)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A classifier cache with the digits 8x8 classifier already trained, shared by the fid tests."""
    from dia_diffusion.evaluation.feature_extractors import build_feature_extractor

    folder = tmp_path_factory.mktemp("cache")
    build_feature_extractor("classifier", 8, 1, classifier_dataset="digits", cache_dir=folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A folder holding a tiny randomly initialised DINOv2, saved as transformers saves the real ones."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        image_size=224,
    )
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return folder


# 24 images / batch 4 = 6 batches per epoch in the training tests.
TINY_DATASET_SIZE = 24


def save_tiny_dataset(folder: Path) -> str:
    from dia_diffusion.data.image_datasets import load_image_dataset

    load_image_dataset("digits").select(range(TINY_DATASET_SIZE)).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """The first 24 scikit-learn digits as a `save_to_disk` folder: a dataset that trains in a fraction of a second."""
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "digits24")


def tiny_config(**overrides) -> dict:
    """A 16x16 RGB UNet with an attention level, for model tests; keyword arguments override its settings."""
    config = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    config.update(overrides)
    return config


# Every block type built from plain ResnetBlock2D, with resnet up/downsamplers as well.
ALL_BLOCKS_CONFIG = tiny_config(
    block_out_channels=(16, 24, 32),
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet",
    upsample_type="resnet",
    resnet_time_scale_shift="scale_shift",
)


def inputs(batch: int = 2, size: int = 16, seed: int = 0, channels: int = 3):
    """A noisy sample and a timestep per image."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, size, size, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), generator=generator)
    return sample, timestep


@contextmanager
def isolated_accelerate():
    """Fresh accelerate singletons after a training run in this process, and one thread during it: the tiny test
    models gain nothing from a second thread, and oversubscribed threads slow them down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory) -> str:
    """XDG_CACHE_HOME for the runs that evaluate: the metric's classifier trains once per test module."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches image folders it has read; keep that cache inside the test's own folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


@pytest.fixture
def isolated_run():
    with isolated_accelerate():
        yield


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA; where there is none they are reported as skipped, not failed."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
