"""IDX files, MnistDataset and the embedded Fashion-MNIST subset."""

import gzip

import numpy as np
import pytest

from engine.data import DataError, MnistDataset, embedded_dir, load_default, read_idx, write_idx
from engine.data.idx import encode_idx, parse_idx
from engine.data.make_embedded import DEBIAN_SOURCE, balanced_indices, make_subset


def make_idx_dir(root, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(1).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / name, images)
    back = read_idx(tmp_path / name, expected_ndim=3)
    assert back.dtype == np.uint8 and back.shape == (7, 5, 3)
    np.testing.assert_array_equal(back, images)


def test_idx_header_is_the_standard_one():
    raw = encode_idx(np.zeros((2, 28, 28), np.uint8))
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == (2).to_bytes(4, "big")
    assert encode_idx(np.zeros(3, np.uint8))[:4] == b"\x00\x00\x08\x01"


def test_gz_files_are_reproducible(tmp_path):
    data = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", data)
    write_idx(tmp_path / "b.gz", data)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_truncated_file_names_file_and_problem(tmp_path):
    raw = encode_idx(np.zeros((4, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x.gz"
    noise = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    full = gzip.compress(encode_idx(noise))
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="x.gz"):
        read_idx(path)


def test_trailing_bytes_rejected(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(encode_idx(np.zeros(3, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="trailing"):
        read_idx(path)


WRONG_MAGICS = [b"\x00\x00\x08\x05", b"\x00\x00\x0d\x03", b"\x12\x34\x08\x03", b"PK\x03\x04"]


@pytest.mark.parametrize("magic", WRONG_MAGICS)
def test_wrong_magic(tmp_path, magic):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(magic + encode_idx(np.zeros((1, 2, 2), np.uint8))[4:])
    with pytest.raises(DataError, match=r"bad-idx3-ubyte.*wrong magic"):
        read_idx(path)


def test_labels_file_where_images_expected():
    with pytest.raises(DataError, match="expected 3"):
        parse_idx(encode_idx(np.zeros(5, np.uint8)), "f", expected_ndim=3)


def test_short_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00", "f")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope")
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_dataset_items(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = MnistDataset(tmp_path, split="test")
    images, labels = arrays["t10k"]
    assert ds.size() == len(ds) == 5
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert y == labels[3] and ds.labels.dtype == np.int64
    np.testing.assert_allclose(x[0], (images[3] / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.get_batch([3])[0][0], x)


def test_mnist_options(tmp_path):
    arrays = make_idx_dir(tmp_path)
    plain = MnistDataset(tmp_path, normalize=False, pad=2, limit=4)
    assert plain.size() == 4 and plain.image_shape == (1, 32, 32)
    x, _ = plain.get_item(1)
    assert x.shape == (1, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert np.all(x[:, :2] == 0) and np.all(x[:, :, -2:] == 0)
    np.testing.assert_allclose(x[0, 2:-2, 2:-2], arrays["train"][0][1] / 255.0, rtol=1e-6)
    custom = MnistDataset(tmp_path, mean=0.5, std=0.25)
    np.testing.assert_allclose(
        custom.get_item(0)[0][0], (arrays["train"][0][0] / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5
    )
    for bad in ({"split": "val"}, {"pad": -1}, {"std": 0}, {"limit": 0}):
        with pytest.raises(ValueError):
            MnistDataset(tmp_path, **bad)


def test_mnist_count_mismatch_and_missing(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        MnistDataset(tmp_path, split="test")
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        MnistDataset(tmp_path, split="train")


def test_balanced_indices_deterministic():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    a, b = balanced_indices(labels, 4, seed=0), balanced_indices(labels, 4, seed=0)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0) and np.bincount(labels[a]).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="only 5"):
        balanced_indices(labels, 6, seed=0)


# --- the embedded subset -------------------------------------------------------------------------


def test_embedded_within_budget_and_licensed():
    files = {p.name: p.stat().st_size for p in embedded_dir().iterdir()}
    assert sum(files.values()) <= 5_000_000
    assert "LICENSE-fashion-mnist.txt" in files
    text = (embedded_dir() / "LICENSE-fashion-mnist.txt").read_text()
    assert "Zalando SE" in text and "MIT" in text and "SUBSET" in text


@pytest.mark.parametrize("split,n", [("train", 9000), ("test", 2000)])
def test_embedded_loads_balanced(split, n):
    ds = load_default(split, normalize=False)
    assert ds.size() == n and ds.raw.shape == (n, 28, 28)
    assert np.bincount(ds.labels, minlength=10).tolist() == [n // 10] * 10
    pixels = ds.raw.astype(np.float64) / 255.0
    assert 0.25 < pixels.mean() < 0.33 and 0.3 < pixels.std() < 0.4  # Fashion-MNIST: 0.286, 0.353
    assert ds.raw.min() == 0 and ds.raw.max() == 255
    # per class, the mean image differs: the labels really belong to the images
    means = np.stack([pixels[ds.labels == c].mean(0) for c in range(10)])
    assert np.abs(means[1] - means[8]).mean() > 0.1  # trousers vs bags
    # images are distinct (not padding or one repeated sample)
    assert len({img.tobytes() for img in ds.raw[:200]}) == 200


def test_make_embedded_is_reproducible(tmp_path):
    """The script rebuilds the shipped files byte for byte (small variant: same code path, fast)."""
    if not (DEBIAN_SOURCE / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    make_subset(DEBIAN_SOURCE, tmp_path, train_per_class=2, test_per_class=200, seed=0)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (tmp_path / name).read_bytes() == (embedded_dir() / name).read_bytes()


def test_full_fashion_mnist_directory_loads():
    if not (DEBIAN_SOURCE / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    train, test = MnistDataset(DEBIAN_SOURCE), MnistDataset(DEBIAN_SOURCE, split="test")
    assert (train.size(), test.size()) == (60000, 10000)
    assert np.bincount(test.labels).tolist() == [1000] * 10
