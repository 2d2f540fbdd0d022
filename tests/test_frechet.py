"""The Fréchet distance: its maths against a direct SciPy evaluation, and the feature statistics it uses."""

import numpy as np
import pytest
import scipy.linalg

from dia_diffusion.evaluation.frechet import FeatureStatistics, frechet_distance, frechet_distance_between


def scipy_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The textbook formula, evaluated directly in float64 with scipy's matrix square root."""
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    sqrt_product = scipy.linalg.sqrtm(covariance_a @ covariance_b).real
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(covariance_a + covariance_b - 2 * sqrt_product))


def random_features(seed: int, count: int = 400, dimension: int = 32, shift: float = 0.0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    mixing = generator.normal(size=(dimension, dimension)) / np.sqrt(dimension)
    return generator.normal(size=(count, dimension)) @ mixing + shift


def test_distance_of_a_set_to_itself_is_zero():
    statistics = FeatureStatistics.of(random_features(0))
    distance = frechet_distance_between(statistics, statistics)
    assert abs(distance) < 1e-10 * np.trace(statistics.covariance)


@pytest.mark.parametrize(("seed", "shift"), [(1, 0.0), (2, 0.3), (3, 2.0)])
def test_distance_matches_a_direct_float64_scipy_evaluation(seed, shift):
    features_a = random_features(seed)
    features_b = random_features(seed + 100, shift=shift)
    expected = scipy_frechet_distance(features_a, features_b)
    measured = frechet_distance_between(FeatureStatistics.of(features_a), FeatureStatistics.of(features_b))
    assert measured == pytest.approx(expected, rel=1e-6)


def test_distance_is_symmetric_and_handles_fewer_samples_than_dimensions():
    features_a, features_b = random_features(4, count=10), random_features(5, count=12, shift=0.5)
    statistics_a, statistics_b = FeatureStatistics.of(features_a), FeatureStatistics.of(features_b)
    forward = frechet_distance_between(statistics_a, statistics_b)
    assert forward == pytest.approx(frechet_distance_between(statistics_b, statistics_a), rel=1e-9)
    assert forward == pytest.approx(scipy_frechet_distance(features_a, features_b), rel=1e-6)


def test_statistics_accumulated_in_batches_equal_those_of_the_whole_set():
    features = random_features(6, shift=1.0)
    batched = FeatureStatistics.empty(features.shape[1])
    for start in range(0, len(features), 37):
        batched.update(features[start : start + 37])
    np.testing.assert_allclose(batched.mean, features.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(batched.covariance, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)


def test_statistics_survive_a_save_and_load(tmp_path):
    statistics = FeatureStatistics.of(random_features(7))
    statistics.save(
        tmp_path / "reference.npz", {"feature_extractor": {"kind": "classifier"}, "resolution": 8}
    )
    loaded, metadata = FeatureStatistics.load(tmp_path / "reference.npz")
    assert loaded.count == statistics.count
    np.testing.assert_array_equal(loaded.outer_product_sum, statistics.outer_product_sum)
    assert metadata == {"feature_extractor": {"kind": "classifier"}, "resolution": 8}
    assert [path.name for path in tmp_path.iterdir()] == ["reference.npz"]


def test_mismatched_inputs_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="covariance_b"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance_between(
            FeatureStatistics.of(random_features(0)), FeatureStatistics.of(random_features(0, dimension=8))
        )
    with pytest.raises(ValueError, match="NaN"):
        FeatureStatistics.of(np.full((3, 2), np.nan))
