"""`ClassConditionalPipeline`: sampling a class-conditional pixel-space UNet (`UNet2DModel` or `DIAUNet2DModel` with
`num_class_embeds`) with classifier-free guidance, through the API of diffusers' `DiTPipeline` (`class_labels`,
`guidance_scale`, `generator`, `num_inference_steps`, `output_type`, `id2label` and `get_label_ids`).

The UNet's last class embedding is the null class: training drops a label to it with probability `--class_dropout`,
and guidance extrapolates from the null-class prediction towards the labelled one (Ho & Salimans 2022, eq. 6):
`ε̃ = ε(x, ∅) + s·(ε(x, y) − ε(x, ∅))`, which for s = 1 is the conditional prediction itself.
"""

import inspect
from dataclasses import dataclass, replace

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with classifier-free guidance.

    Parameters:
        unet: a `UNet2DModel` (or `DIAUNet2DModel`) built with `num_class_embeds` = number of classes + 1 (the null
            class, the last id).
        scheduler: a `DDPMScheduler` or `DDIMScheduler` (any scheduler with `set_timesteps` and `step`).
        id2label (`dict[int, str]`, *optional*): class names, saved with the pipeline; `get_label_ids` maps names
            (several per class may be given, comma-separated, as DiT's ImageNet labels are) to ids.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, id2label: dict | None = None):
        super().__init__()
        if not unet.config.get("num_class_embeds"):
            raise ValueError(
                "ClassConditionalPipeline needs a UNet with num_class_embeds (the classes + a null class)"
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        id2label = {int(key): value for key, value in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.labels = {
            name.strip(): key
            for key, names in sorted(id2label.items())
            for name in names.split(",")
            if name.strip()
        }

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of class names (see `labels`)."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; the pipeline knows {sorted(self.labels)}")
        return [self.labels[name] for name in names]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""One image per entry of `class_labels`.

        Args:
            class_labels: class ids, `0 <= id < num_classes`.
            guidance_scale: `s` of classifier-free guidance; 1 samples the conditional model as it is, larger values
                follow the class more closely at some cost in diversity, 0 samples the unconditional (null-class)
                model.
            generator: one generator, or one per image (then image i depends only on its own generator).
            num_inference_steps: denoising steps.
            eta: η of DDIM (0 is deterministic); ignored by schedulers that take none.
            output_type: `"pil"`, `"np"` or `"pt"`.
        """
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        bad = [label for label in labels if not 0 <= int(label) < self.num_classes]
        if bad:
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got {bad}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must not be negative, got {guidance_scale}")
        device = self._execution_device
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        image = randn_tensor(
            (len(labels), self.unet.config.in_channels, *size),
            generator=generator,
            device=device,
            dtype=self.unet.dtype,
        )
        labels = torch.tensor(labels, device=device, dtype=torch.long)
        guided = guidance_scale != 1
        if guided:
            # One UNet call serves both predictions: the batch with its labels, then with the null class.
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        step_options = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if guided else image
            prediction = self.unet(model_input, t, labels).sample
            if guided:
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            image = self.scheduler.step(prediction, t, image, generator=generator, **step_options).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@dataclass(frozen=True)
class ClassSampling:
    """Which class each image of a class-conditional sampling run shows, and the guidance it is sampled with.

    Image i shows `class_labels[i % len(class_labels)]`, or with no labels given class i mod K: every class in turn,
    as many images of each (a class-balanced set for evaluation) when the count is a multiple of K. A label is a
    class id or, as a string, a class name of the pipeline's `id2label`; `for_pipeline` turns names into ids.
    """

    class_labels: tuple[int | str, ...] | None = None
    guidance_scale: float = 1.0

    def labels(self, indices: list[int], num_classes: int) -> list[int]:
        if not self.class_labels:
            return [index % num_classes for index in indices]
        return [self.class_labels[index % len(self.class_labels)] for index in indices]

    def for_pipeline(self, pipeline: DiffusionPipeline) -> "ClassSampling":
        """This sampling with every class name replaced by its id in `pipeline`, once its labels and guidance are
        checked to be for a class-conditional pipeline and its labels to be that pipeline's classes."""
        if not isinstance(pipeline, ClassConditionalPipeline):
            if self.class_labels or self.guidance_scale != 1.0:
                raise ValueError(
                    "--class_labels and --guidance_scale need a class-conditional model; this one has none"
                )
            return self
        if self.guidance_scale < 0:
            raise ValueError(f"--guidance_scale must not be negative, got {self.guidance_scale}")
        if not self.class_labels:
            return self
        ids = tuple(
            label if isinstance(label, int) else pipeline.get_label_ids(label)[0]
            for label in self.class_labels
        )
        bad = [label for label in ids if not 0 <= label < pipeline.num_classes]
        if bad:
            raise ValueError(f"--class_labels must lie in [0, {pipeline.num_classes}), got {bad}")
        return replace(self, class_labels=ids)


# Every class in turn, without guidance: what evaluation samples unless told otherwise.
EVERY_CLASS = ClassSampling()
