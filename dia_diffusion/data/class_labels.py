"""The classes of a labelled dataset, for class-conditional training: how many there are and what they are called.

Every dataset spec loads with an integer "label" column where its source has labels (`image_datasets.py`): the
bundled digits, Fashion-MNIST, CIFAR-10, an image folder with one sub-folder per class, a `datasets` folder or hub
dataset with a label column.
"""

import datasets

from dia_diffusion.data.image_datasets import DatasetSpecError


def class_names(dataset: datasets.Dataset, spec: str) -> list[str]:
    """The name of every class id 0..K-1: the `ClassLabel` names, else the ids themselves; a dataset without labels
    is refused in one line."""
    feature = dataset.features.get("label")
    if feature is None:
        raise DatasetSpecError(
            f"--dataset {spec!r} has no labels (columns: {', '.join(dataset.column_names)}); class-conditional "
            "training needs a 'label' column, an image folder with one sub-folder per class, or a labelled built-in"
        )
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = dataset["label"]
    if min(labels) < 0:
        raise DatasetSpecError(f"--dataset {spec!r}: labels must be class ids from 0, found {min(labels)}")
    return [str(index) for index in range(max(labels) + 1)]
