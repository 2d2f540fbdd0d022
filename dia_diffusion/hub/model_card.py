"""The model card: the README.md beside a saved DIA model that says what it is, what DIA cost, how it was trained,
how well it samples and how to load it.

The metadata is `huggingface_hub`'s `ModelCardData` (library, license, tags, base model, datasets), written as the
YAML header the Hugging Face Hub reads; the body is Markdown. A card is rebuilt on every save from the facts given,
so it always describes the weights beside it. What differs between kinds of model (the task tag, the lines that
load and sample it) is a `CardTask`; the trainers and the model classes each supply theirs.
"""

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from dia_diffusion.hub.upload import is_hub_name

CARD_FILENAME = "README.md"
LICENSE = "apache-2.0"
DIA_TAG = "dia"
DIA_PAPER = "https://arxiv.org/abs/1905.10671"


@dataclass(frozen=True)
class CardTask:
    """What a kind of saved model is for: its hub task tag, and the lines that load and sample it.

    `usage` lines may use `{source}` (where the model is loaded from: a folder or a hub name) and `{class_name}`.
    """

    tag: str | None
    what: str
    usage: tuple[str, ...]


UNCONDITIONAL_PIPELINE = CardTask(
    tag="unconditional-image-generation",
    what="an unconditional image diffusion pipeline (`DDPMPipeline`)",
    usage=(
        "import dia_diffusion  # registers the DIA UNet classes, so diffusers can load the folder",
        "from diffusers import DDPMPipeline",
        "",
        'pipeline = DDPMPipeline.from_pretrained("{source}")',
        "images = pipeline(batch_size=16, num_inference_steps=250).images",
    ),
)
CLASS_CONDITIONAL_PIPELINE = CardTask(
    tag="class-conditional-image-generation",
    what="a class-conditional image diffusion pipeline (`ClassConditionalPipeline`, classifier-free guidance)",
    usage=(
        "from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline",
        "",
        'pipeline = ClassConditionalPipeline.from_pretrained("{source}")',
        "images = pipeline(class_labels=[0, 1, 2, 3], guidance_scale=1.0, num_inference_steps=250).images",
    ),
)
TEXT_TO_IMAGE_PIPELINE = CardTask(
    tag="text-to-image",
    what="a Stable Diffusion pipeline (`StableDiffusionPipeline`) whose UNet was fine-tuned by dia_diffusion",
    usage=(
        "import dia_diffusion  # registers the DIA UNet classes, so diffusers can load the folder",
        "from diffusers import StableDiffusionPipeline",
        "",
        'pipeline = StableDiffusionPipeline.from_pretrained("{source}")',
        'image = pipeline("a photograph of an astronaut riding a horse", num_inference_steps=30).images[0]',
    ),
)
UNCONDITIONAL_UNET = CardTask(
    tag="unconditional-image-generation",
    what="a UNet for unconditional image diffusion",
    usage=(
        "from diffusers import DDPMPipeline, DDPMScheduler",
        "from dia_diffusion import {class_name}",
        "",
        'unet = {class_name}.from_pretrained("{source}")',
        "pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())  # with the noise schedule it was trained with",
        "images = pipeline(batch_size=16, num_inference_steps=250).images",
    ),
)

# Any other DIA UNet (a conditional one, say), until its class names its own task (`model_card_task`).
DIA_UNET = CardTask(
    tag=None,
    what="a UNet",
    usage=(
        "from dia_diffusion import {class_name}",
        "",
        'unet = {class_name}.from_pretrained("{source}")  # then unet=unet in the diffusers pipeline it belongs to',
    ),
)


@dataclass(frozen=True)
class ModelFacts:
    """Everything a card says. `training`, `metric` and `sample_grid` come from a training run, when there is one.

    `metric`: `{"key", "name", "value", "step"}` plus how it was measured (`feature_extractor`, `num_samples`,
    `sampler`, `reference`); `sample_grid`: a path relative to the card's folder.
    """

    class_name: str
    task: CardTask
    source: str
    dia_options: dict[str, Any]
    parameters: int
    stock_class_name: str
    stock_parameters: int
    base_model: str | None = None
    datasets: tuple[str, ...] = ()
    dataset_description: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, Any] | None = None
    sample_grid: str | None = None
    license: str = LICENSE

    @property
    def with_dia(self) -> bool:
        """A stock UNet (the baseline a DIA run is compared with) has no DIA options; its card must not claim DIA."""
        return bool(self.dia_options)


def build_model_card(facts: ModelFacts) -> ModelCard:
    data = ModelCardData(
        library_name="diffusers",
        license=facts.license,
        tags=[
            "diffusers",
            *([DIA_TAG] if facts.with_dia else []),
            *([facts.task.tag] if facts.task.tag else []),
        ],
        pipeline_tag=facts.task.tag,
        # The hub accepts only repository ids here; a local starting point is named in the text.
        base_model=facts.base_model if is_hub_name(facts.base_model) else None,
        datasets=list(facts.datasets) or None,
    )
    what = f"{facts.task.what[0].upper()}{facts.task.what[1:]}"
    sections = [
        f"# {what} with Dense-and-Implicit Attention"
        if facts.with_dia
        else f"# {what}: the stock UNet, without DIA",
        description(facts),
        "## DIA options and what they cost" if facts.with_dia else "## Parameters",
        dia_table(facts) if facts.with_dia else f"| parameters |\n| ---: |\n| {facts.parameters:,} |",
    ]
    if facts.training:
        sections += ["## Training", settings_table(facts.training)]
    if facts.metric is not None:
        sections += ["## Evaluation during training", metric_sentence(facts.metric)]
    if facts.sample_grid is not None:
        sections += ["## Samples", f"![samples]({facts.sample_grid})"]
    usage = "\n".join(facts.task.usage).format(source=facts.source, class_name=facts.class_name)
    sections += [
        "## Use",
        "Needs the `dia_diffusion` package installed beside diffusers.",
        f"```python\n{usage}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def description(facts: ModelFacts) -> str:
    text = (
        f"A diffusers `{facts.class_name}` whose resnets share one Dense-and-Implicit Attention (DIA) module "
        f"([paper]({DIA_PAPER})), saved by `dia_diffusion`."
        if facts.with_dia
        else f"A stock diffusers `{facts.class_name}`, without Dense-and-Implicit Attention (DIA), trained by "
        "`dia_diffusion` as the baseline that DIA is compared with."
    )
    if facts.base_model is not None:
        text += f" It starts from the weights of `{facts.base_model}`" + (
            ", retrofitted with DIA." if facts.with_dia else "."
        )
    if facts.dataset_description is not None:
        text += f" Trained on {facts.dataset_description}."
    return text


def dia_table(facts: ModelFacts) -> str:
    added = facts.parameters - facts.stock_parameters
    percent = 100 * added / facts.stock_parameters if facts.stock_parameters else 0.0
    rows = [("option", "value"), ("---", "---")]
    rows += [(f"`{name}`", f"`{value!r}`") for name, value in facts.dia_options.items()]
    rows += [
        ("parameters", f"{facts.parameters:,}"),
        (f"stock `{facts.stock_class_name}`, same layout", f"{facts.stock_parameters:,}"),
        ("added by DIA", f"{added:+,} ({percent:+.2f} %)"),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def settings_table(settings: dict[str, Any]) -> str:
    rows = [("setting", "value"), ("---", "---")]
    rows += [(f"`{name}`", f"`{value!r}`") for name, value in settings.items()]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def metric_sentence(metric: dict[str, Any]) -> str:
    """The last metric measured during training, named by what it was measured in."""
    text = f"**{metric['name']}** (`{metric['key']}`) = {metric['value']:.4g} at step {metric['step']:,}"
    details = [
        f"{label}: {metric[key]}"
        for key, label in (
            ("feature_extractor", "features"),
            ("num_samples", "generated samples"),
            ("sampler", "sampler"),
            ("reference", "reference"),
        )
        if metric.get(key) is not None
    ]
    if details:
        text += " (" + "; ".join(details) + ")"
    if metric["key"] != "fid":
        text += ". It is a Fréchet distance in these features, not FID, and is comparable only with the same features"
    return text + "."


def write_model_card(folder: str | Path, facts: ModelFacts) -> Path:
    path = Path(folder) / CARD_FILENAME
    build_model_card(facts).save(str(path))
    return path


_PIPELINE_WRITES_THE_CARD = contextvars.ContextVar("pipeline_writes_the_card", default=False)


@contextmanager
def pipeline_card_only() -> Iterator[None]:
    """While a pipeline is saved by code that writes the pipeline's own card, its models write none of their own:
    the pipeline folder has one card, at its root, as on the hub."""
    token = _PIPELINE_WRITES_THE_CARD.set(True)
    try:
        yield
    finally:
        _PIPELINE_WRITES_THE_CARD.reset(token)


def model_cards_wanted() -> bool:
    return not _PIPELINE_WRITES_THE_CARD.get()
