"""IDataView implementations and DataLoader semantics."""

import numpy as np
import pytest

from engine.data import ArrayDataset, DataLoader, IDataView, Subset, TransformedView


class Squares(IDataView):
    """A view with only the two required methods: exercises the default get_batch."""

    def __init__(self, n):
        self.n = n

    def get_item(self, idx):
        return np.full((2,), idx, dtype=np.float64), idx * idx

    def size(self):
        return self.n


def numbered(n=10):
    return ArrayDataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n))


def test_idataview_is_abstract_and_delegates():
    with pytest.raises(TypeError):
        IDataView()
    view = Squares(5)
    assert len(view) == 5
    data, label = view[-1]
    assert label == 16 and data.tolist() == [4.0, 4.0]
    with pytest.raises(IndexError, match="out of range"):
        view[5]
    batch, labels = view.get_batch([1, 3])
    assert batch.shape == (2, 2) and labels.tolist() == [1, 9]


def test_array_dataset_checks_lengths():
    with pytest.raises(ValueError, match="3 items but labels has 2"):
        ArrayDataset(np.zeros((3, 2)), np.zeros(2))
    ds = numbered(4)
    x, y = ds.get_batch(np.array([2, 0]))
    assert x[:, 0].tolist() == [2, 0] and y.tolist() == [2, 0]


def test_subset_and_transformed_view():
    sub = Subset(numbered(10), [7, 2, 5])
    assert sub.size() == 3 and sub[0][1] == 7
    assert sub.get_batch([2, 0])[1].tolist() == [5, 7]
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        Subset(numbered(10), [3, 10])
    doubled = TransformedView(sub, lambda x: x * 2)
    assert doubled.size() == 3 and doubled.get_item(1)[0][0] == 4
    assert doubled.get_batch([0, 1])[0][:, 0].tolist() == [14, 4]


def test_size_with_and_without_drop_last():
    assert DataLoader(numbered(10), batch_size=3).size() == 3
    assert len(DataLoader(numbered(10), batch_size=3, drop_last=False)) == 4
    assert DataLoader(numbered(9), batch_size=3).size() == 3
    assert DataLoader(numbered(2), batch_size=5, drop_last=False).size() == 1


def test_iteration_without_drop_last_covers_everything_in_order():
    batches = list(DataLoader(numbered(10), batch_size=4, drop_last=False))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert np.concatenate([y for _, y in batches]).tolist() == list(range(10))


def test_drop_last_drops_the_partial_batch():
    batches = list(DataLoader(numbered(10), batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4]


def test_dtypes():
    x, y = DataLoader(Squares(4), batch_size=2).next()
    assert x.dtype == np.float32 and y.dtype == np.int64
    regression = ArrayDataset(np.zeros((4, 3)), np.linspace(0, 1, 4))
    assert DataLoader(regression, batch_size=2).next()[1].dtype == np.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(numbered(4), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        DataLoader(ArrayDataset(np.zeros((0, 2)), np.zeros(0)), batch_size=1)
    with pytest.raises(ValueError, match="drop_last"):
        DataLoader(numbered(4), batch_size=5, drop_last=True)


def epoch_orders(loader, epochs):
    """Label order of each epoch, read through next()."""
    return [np.concatenate([loader.next()[1] for _ in range(loader.size())]).tolist() for _ in range(epochs)]


def test_next_cycles_with_a_new_permutation_every_epoch():
    loader = DataLoader(numbered(20), batch_size=5, shuffle=True, seed=3)
    orders = epoch_orders(loader, 4)
    assert loader.epoch == 4
    for order in orders:  # every item exactly once per epoch
        assert sorted(order) == list(range(20))
    assert len({tuple(o) for o in orders}) == 4  # a different order each epoch
    assert orders[0] != list(range(20))


def test_same_seed_same_orders_other_seed_differs():
    a = epoch_orders(DataLoader(numbered(20), batch_size=5, shuffle=True, seed=7), 3)
    b = epoch_orders(DataLoader(numbered(20), batch_size=5, shuffle=True, seed=7), 3)
    c = epoch_orders(DataLoader(numbered(20), batch_size=5, shuffle=True, seed=8), 3)
    assert a == b and a != c


def test_iter_epochs_also_reshuffle():
    loader = DataLoader(numbered(12), batch_size=4, shuffle=True, seed=0)
    first = np.concatenate([y for _, y in loader]).tolist()
    second = np.concatenate([y for _, y in loader]).tolist()
    assert sorted(first) == sorted(second) == list(range(12)) and first != second


def test_drop_last_with_shuffle_varies_the_dropped_items():
    loader = DataLoader(numbered(10), batch_size=4, shuffle=True, seed=1)
    seen = set()
    for order in epoch_orders(loader, 6):
        assert len(order) == 8 and len(set(order)) == 8
        seen.update(order)
    assert seen == set(range(10))  # no item is dropped forever


def test_unshuffled_next_wraps_around():
    loader = DataLoader(numbered(5), batch_size=2, drop_last=False)
    labels = [loader.next()[1].tolist() for _ in range(4)]
    assert labels == [[0, 1], [2, 3], [4], [0, 1]]


def test_data_matches_labels_after_shuffle():
    loader = DataLoader(numbered(50), batch_size=7, shuffle=True, seed=2)
    for _ in range(10):
        x, y = loader.next()
        np.testing.assert_array_equal(x[:, 0], y.astype(np.float32))
