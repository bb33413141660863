import numpy as np
import pytest

from fedtune.simulations.partition import PartitionError, by_column, dirichlet, iid


def _check_disjoint_complete(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert len(np.unique(allidx)) == n
    assert set(allidx.tolist()) == set(range(n))


def test_iid_disjoint_complete_deterministic():
    parts = iid(103, 4, seed=7)
    _check_disjoint_complete(parts, 103)
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    again = iid(103, 4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid(103, 4, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skews_labels_and_is_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=2000).astype(str)
    parts = dirichlet(labels, 5, alpha=0.1, seed=3)
    _check_disjoint_complete(parts, 2000)
    again = dirichlet(labels, 5, alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # With alpha = 0.1 each site is dominated by few labels: the top label share is far above 1/10.
    top_share = [np.max(np.unique(labels[p], return_counts=True)[1]) / len(p) for p in parts]
    assert np.mean(top_share) > 0.3
    # A large alpha is close to IID.
    flat = dirichlet(labels, 5, alpha=1000.0, seed=3)
    flat_share = [np.max(np.unique(labels[p], return_counts=True)[1]) / len(p) for p in flat]
    assert np.mean(flat_share) < 0.2


def test_by_column_one_site_per_value():
    values = ["a"] * 5 + ["b"] * 3 + ["c"] * 7
    parts, groups = by_column(values, 3)
    assert groups == ["c", "a", "b"]
    _check_disjoint_complete(parts, 15)
    for part, g in zip(parts, groups, strict=True):
        assert all(values[i] == g for i in part)
    parts2, groups2 = by_column(values, 2)
    assert groups2 == ["c", "a"] and sum(len(p) for p in parts2) == 12
    with pytest.raises(PartitionError, match="3 distinct values"):
        by_column(values, 4)


def test_too_many_sites_is_an_error():
    with pytest.raises(PartitionError):
        iid(3, 5)
    with pytest.raises(PartitionError):
        dirichlet(["a", "b"], 5, 0.5)
