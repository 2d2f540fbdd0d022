"""The Fréchet distance between Gaussians fitted to two feature sets, and the feature statistics it is computed from.

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)        (Dowson & Landau 1982; FID: Heusel et al. 2017)

Statistics are kept as float64 running sums (count, Σx, Σxxᵀ), the same state torchmetrics'
FrechetInceptionDistance accumulates: sums from several batches or processes add up exactly, and a reference
saved to `.npz` gives the same distance as the images it came from.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.output_files import write_atomically

STATISTICS_FORMAT = "dia_diffusion.feature_statistics.v1"


@dataclass
class FeatureStatistics:
    """Running float64 sums of a feature set: enough for its mean and (unbiased) covariance."""

    count: int
    feature_sum: np.ndarray
    outer_product_sum: np.ndarray

    @classmethod
    def empty(cls, dimension: int) -> FeatureStatistics:
        return cls(0, np.zeros(dimension), np.zeros((dimension, dimension)))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        statistics = cls.empty(np.shape(features)[1])
        statistics.update(features)
        return statistics

    @property
    def dimension(self) -> int:
        return self.feature_sum.shape[0]

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features, shape [N, dimension]."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.dimension:
            raise ValueError(f"features must have shape [N, {self.dimension}], got {list(features.shape)}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        self.count += features.shape[0]
        self.feature_sum += features.sum(axis=0)
        self.outer_product_sum += features.T @ features

    @property
    def mean(self) -> np.ndarray:
        return self.feature_sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (divides by N − 1, as numpy.cov and torchmetrics do)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean
        return (self.outer_product_sum - self.count * np.outer(mean, mean)) / (self.count - 1)

    def save(self, path: str | Path, metadata: dict[str, Any]) -> None:
        """Writes the sums and a JSON record of how the features were made; the file appears complete or not at all."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics file must end in .npz, got {str(path)!r}")
        write_atomically(
            path,
            lambda partial: np.savez(
                partial,
                format=np.array(STATISTICS_FORMAT),
                count=np.array(self.count, dtype=np.int64),
                feature_sum=self.feature_sum,
                outer_product_sum=self.outer_product_sum,
                metadata=np.array(json.dumps(metadata, sort_keys=True)),
            ),
            suffix=".npz",  # np.savez would append it
        )

    @classmethod
    def load(cls, path: str | Path) -> tuple[FeatureStatistics, dict[str, Any]]:
        """Reads a file written by `save`; returns the statistics and their metadata. Another kind of file, or a
        damaged one, raises ValueError naming it."""
        not_statistics = ValueError(
            f"{str(path)!r} is not a feature statistics file written by `dia-diffusion ref`"
        )
        try:
            archive = np.load(path, allow_pickle=False)
        except ValueError:
            raise not_statistics from None  # numpy takes anything that is neither .npy nor .npz for a pickle
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise unreadable(path, error) from None
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
            raise not_statistics
        with archive:
            if "format" not in archive.files or str(archive["format"]) != STATISTICS_FORMAT:
                raise not_statistics
            try:
                statistics = cls(
                    int(archive["count"]),
                    np.array(archive["feature_sum"], dtype=np.float64),
                    np.array(archive["outer_product_sum"], dtype=np.float64),
                )
                metadata = json.loads(str(archive["metadata"]))
            except (KeyError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
                raise unreadable(path, error) from None
        return statistics, metadata


def unreadable(path: str | Path, error: BaseException) -> ValueError:
    return ValueError(f"cannot read feature statistics from {str(path)!r}: {first_line(error)}")


def without_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Zeroes the eigenvalues of a PSD matrix that are round-off (|λ| ≤ n·ε·λ_max): a singular covariance's zero
    eigenvalues come out as ±1e-16-sized noise, whose square roots (~1e-8 each) would otherwise add up."""
    tolerance = eigenvalues.shape[0] * np.finfo(np.float64).eps * np.abs(eigenvalues).max()
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def frechet_distance(
    mean_a: np.ndarray, covariance_a: np.ndarray, mean_b: np.ndarray, covariance_b: np.ndarray
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mean_a, covariance_a) and N(mean_b, covariance_b), float64."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    covariance_a, covariance_b = np.asarray(covariance_a, np.float64), np.asarray(covariance_b, np.float64)
    dimension = mean_a.shape[0]
    for name, array, shape in (
        ("mean_b", mean_b, (dimension,)),
        ("covariance_a", covariance_a, (dimension, dimension)),
        ("covariance_b", covariance_b, (dimension, dimension)),
    ):
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)} to match mean_a, got {list(array.shape)}")

    # Tr((Σ_a Σ_b)^½) is the sum of square roots of the eigenvalues of Σ_a Σ_b, which equal those of the symmetric
    # positive semi-definite Σ_a^½ Σ_b Σ_a^½. Symmetric eigensolvers then give real roots with no complex round-off
    # to discard, even when N < dimension makes the covariances singular.
    eigenvalues_a, eigenvectors_a = np.linalg.eigh(covariance_a)
    sqrt_covariance_a = (eigenvectors_a * np.sqrt(without_round_off(eigenvalues_a))) @ eigenvectors_a.T
    middle = sqrt_covariance_a @ covariance_b @ sqrt_covariance_a
    trace_sqrt_product = np.sqrt(without_round_off(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()

    mean_difference = mean_a - mean_b
    return float(
        mean_difference @ mean_difference
        + np.trace(covariance_a)
        + np.trace(covariance_b)
        - 2.0 * trace_sqrt_product
    )


def frechet_distance_between(statistics_a: FeatureStatistics, statistics_b: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    if statistics_a.dimension != statistics_b.dimension:
        raise ValueError(
            f"feature dimensions differ: {statistics_a.dimension} vs {statistics_b.dimension} "
            "(were both sets measured with the same feature extractor?)"
        )
    return frechet_distance(
        statistics_a.mean, statistics_a.covariance, statistics_b.mean, statistics_b.covariance
    )
