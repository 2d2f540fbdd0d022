"""How often a class-conditional model's samples show the class they were asked for: the fraction of the samples of
class k that the dataset's feature classifier calls k, averaged over the classes (each class counts alike, whatever
its number of samples).

It is measured in the same pass as the FD (classifier features), from the same features: the classifier's head on
the pooled features is its prediction. A model that ignores its labels scores about 1/K, a faithful one about the
classifier's own held-out accuracy, which the result records beside it.
"""

import numpy as np
import torch

from dia_diffusion.evaluation.feature_extractors import ClassifierFeatures


def class_accuracy(extractor: ClassifierFeatures, features: np.ndarray, labels: list[int]) -> dict:
    """{"class_accuracy": mean over classes, "class_accuracy_per_class": {k: accuracy}} of samples [N, D] whose
    requested classes are `labels`."""
    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} samples but {len(labels)} labels")
    with torch.no_grad():
        device = next(extractor.network.parameters()).device
        predicted = extractor.logits(torch.from_numpy(features).to(device)).argmax(dim=1).cpu().numpy()
    requested = np.asarray(labels)
    per_class = {
        int(label): float((predicted[requested == label] == label).mean()) for label in np.unique(requested)
    }
    return {
        "class_accuracy": float(np.mean(list(per_class.values()))),
        "class_accuracy_per_class": per_class,
    }
