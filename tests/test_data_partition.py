"""Partitions of a dataset across devices."""

import numpy as np
import pytest

from engine.data import (
    dirichlet,
    iid,
    label_counts,
    load_default,
    parse_partition,
    quantity_skew,
    shards,
    split_holdout,
)

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class
np.random.default_rng(0).shuffle(LABELS)

SPLITS = {
    "iid": lambda seed: iid(LABELS, 10, seed),
    "dirichlet": lambda seed: dirichlet(LABELS, 10, 0.3, seed),
    "shards": lambda seed: shards(LABELS, 10, 2, seed),
    "quantity": lambda seed: quantity_skew(LABELS, 10, 1.0, seed),
}


def concentration(parts):
    """Mean over devices of the share of the device's most common label."""
    counts = label_counts(LABELS, parts, 10)
    return float(np.mean(counts.max(1) / counts.sum(1)))


@pytest.mark.parametrize("name", SPLITS)
def test_every_sample_exactly_once_and_no_empty_device(name):
    parts = SPLITS[name](0)
    assert len(parts) == 10 and all(len(p) >= 1 for p in parts)
    together = np.concatenate(parts)
    assert len(together) == len(LABELS) and np.array_equal(np.sort(together), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", SPLITS)
def test_deterministic_per_seed(name):
    a, b, c = SPLITS[name](1), SPLITS[name](1), SPLITS[name](2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_sizes_and_label_mix():
    parts = iid(LABELS, 7, seed=0)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert concentration(iid(LABELS, 10, 0)) < 0.25


def test_shards_two_labels_per_device():
    parts = shards(LABELS, 10, 2, seed=0)
    counts = label_counts(LABELS, parts, 10)
    assert np.all((counts > 0).sum(1) <= 2) and all(len(p) == 100 for p in parts)
    one = shards(LABELS, 10, 1, seed=0)
    assert np.all((label_counts(LABELS, one, 10) > 0).sum(1) == 1)


def test_dirichlet_small_alpha_concentrates_labels():
    skewed = np.mean([concentration(dirichlet(LABELS, 10, 0.1, s)) for s in range(3)])
    mild = np.mean([concentration(dirichlet(LABELS, 10, 100.0, s)) for s in range(3)])
    base = np.mean([concentration(iid(LABELS, 10, s)) for s in range(3)])
    assert skewed > 0.5 and skewed > 2 * base
    assert mild < 0.3


def test_dirichlet_never_leaves_a_device_empty():
    labels = np.repeat(np.arange(2), 30)
    for seed in range(10):
        parts = dirichlet(labels, 50, 0.01, seed)
        assert all(len(p) >= 1 for p in parts) and sum(map(len, parts)) == 60


def test_quantity_skew_sizes_vary_but_labels_mixed():
    parts = quantity_skew(LABELS, 10, 0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    big = max(parts, key=len)
    assert len(np.unique(LABELS[big])) == 10
    equalish = np.array([len(p) for p in quantity_skew(LABELS, 10, 1000.0, seed=0)])
    assert equalish.max() - equalish.min() < 30


def test_parse_partition():
    assert str(parse_partition("iid")) == "iid"
    spec = parse_partition("dirichlet:0.3")
    assert (spec.name, spec.param) == ("dirichlet", 0.3)
    assert parse_partition("shards:2")(LABELS, 10, seed=4)[3].tolist() == shards(LABELS, 10, 2, 4)[3].tolist()
    assert parse_partition("quantity:1.0").name == "quantity" and str(parse_partition("shards")) == "shards:2"
    bad_specs = (
        ("random", "unknown partition"),
        ("dirichlet:abc", "not a number"),
        ("dirichlet:-1", "positive"),
        ("shards:1.5", "whole number"),
        ("iid:3", "no parameter"),
    )
    for bad, message in bad_specs:
        with pytest.raises(ValueError, match=message):
            parse_partition(bad)


def test_argument_errors():
    with pytest.raises(ValueError, match="n_devices"):
        iid(LABELS, 0)
    with pytest.raises(ValueError, match="cannot give each"):
        iid(LABELS[:3], 4)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 3, 0.0)
    with pytest.raises(ValueError, match="shards"):
        shards(LABELS[:10], 5, 3)


def test_split_holdout():
    indices = np.arange(100, 150)
    train, held = split_holdout(indices, 0.2, seed=0)
    assert len(held) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, held])), indices)
    again = split_holdout(indices, 0.2, seed=0)
    assert np.array_equal(again[1], held) and not np.array_equal(split_holdout(indices, 0.2, 1)[1], held)
    assert [len(p) for p in split_holdout(np.arange(2), 0.1)] == [1, 1]  # at least one held out
    assert [len(p) for p in split_holdout(np.arange(1), 0.5)] == [1, 0]  # training keeps one
    assert len(split_holdout(indices, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(indices, 1.0)


def test_shards_on_the_embedded_data():
    labels = load_default("train").labels
    parts = shards(labels, 100, 2, seed=0)  # 9,000 samples -> 200 shards of 45 (900 per class divides)
    assert np.all((label_counts(labels, parts, 10) > 0).sum(1) <= 2)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
