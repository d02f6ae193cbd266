"""NpzDataset, CsvDataset, ImageFolderDataset, open_dataset and transforms."""

import numpy as np
import pytest

from engine.data import (
    Compose,
    CsvDataset,
    DataError,
    DataLoader,
    ImageFolderDataset,
    MnistDataset,
    Normalize,
    NpzDataset,
    RandomCrop,
    RandomHorizontalFlip,
    TransformedView,
    open_dataset,
    write_idx,
)


def test_npz_reads_named_arrays(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(6, 3)), np.arange(6)
    np.savez(tmp_path / "d.npz", features=x, target=y)
    ds = NpzDataset(tmp_path / "d.npz", x_key="features", y_key="target")
    assert ds.size() == 6
    np.testing.assert_array_equal(ds.get_item(4)[0], x[4])
    with pytest.raises(DataError, match=r"no array named 'x'.*features"):
        NpzDataset(tmp_path / "d.npz")


def test_npz_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.arange(2))
    with pytest.raises(DataError, match="without pickle"):
        NpzDataset(tmp_path / "evil.npz")


def test_npz_bad_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="junk.npz"):
        NpzDataset(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match="single .npy"):
        NpzDataset(tmp_path / "single.npz")
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(DataError, match="mismatch.npz.*3 items"):
        NpzDataset(tmp_path / "mismatch.npz")
    with pytest.raises(DataError, match="not found"):
        NpzDataset(tmp_path / "absent.npz")


def test_csv_with_header_and_shape(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["p0,label,p1,p2,p3"] + [f"{i},{i % 3},{i + 1},{i + 2},{i + 3}" for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    ds = CsvDataset(path, shape=(1, 2, 2))
    assert ds.size() == 5 and ds.header[1] == "label"
    x, y = ds.get_item(4)
    assert x.shape == (1, 2, 2) and x.dtype == np.float32 and y == 1
    assert x.reshape(-1).tolist() == [4, 5, 6, 7]
    assert ds.labels.dtype == np.int64
    with pytest.raises(DataError, match="cannot be reshaped"):
        CsvDataset(path, shape=(3, 3))
    with pytest.raises(DataError, match=r"no column 'y'.*p0"):
        CsvDataset(path, label_column="y")


def test_csv_without_header_uses_an_index(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("0.5,1.0,0.25\n1.5,2.0,0.75\n")
    ds = CsvDataset(path, label_column=-1)
    assert ds.header is None and ds.labels.dtype == np.float32
    assert ds.labels.tolist() == [0.25, 0.75] and ds.get_item(1)[0].tolist() == [1.5, 2.0]
    with pytest.raises(DataError, match="no header"):
        CsvDataset(path)
    with pytest.raises(DataError, match="out of range"):
        CsvDataset(path, label_column=3)


def test_csv_non_numeric_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,label\n1,2\nx,3\n")
    with pytest.raises(DataError, match="bad.csv.*not a numeric CSV"):
        CsvDataset(path)


def make_image_folder(root, Image):
    rng = np.random.default_rng(0)
    for name, value in (("cat", 30), ("ant", 200)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((10, 12, 3), value, np.uint8) + rng.integers(0, 5, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("ignored")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    make_image_folder(tmp_path / "imgs", Image)
    ds = open_dataset(tmp_path / "imgs", size=(8, 6))
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["ant", "cat"] and ds.size() == 6
    x, y = ds.get_item(0)
    assert x.shape == (1, 8, 6) and x.dtype == np.float32 and y == 0
    assert 0.75 < x.mean() < 0.82  # ant pixels ~200/255
    assert ds.get_item(5)[1] == 1 and ds.get_item(5)[0].mean() < 0.15
    rgb = open_dataset(tmp_path / "imgs", grayscale=False)
    assert rgb.get_item(0)[0].shape == (3, 28, 28)
    xb, yb = DataLoader(ds, batch_size=6).next()
    assert xb.shape == (6, 1, 8, 6) and yb.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_bad_image(tmp_path):
    pytest.importorskip("PIL.Image")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = open_dataset(tmp_path)
    with pytest.raises(DataError, match="broken.png"):
        ds.get_item(0)


def test_open_dataset_picks_the_reader(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(idx / "t10k-labels-idx1-ubyte.gz", np.arange(3, dtype=np.uint8))
    assert isinstance(open_dataset(idx, split="test"), MnistDataset)
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 1)), y=np.zeros(2))
    assert isinstance(open_dataset(tmp_path / "a.npz"), NpzDataset)
    (tmp_path / "a.csv").write_text("label,f\n1,2\n")
    assert isinstance(open_dataset(tmp_path / "a.csv"), CsvDataset)
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type '.json'"):
        open_dataset(tmp_path / "a.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither an IDX dataset .* nor an image folder"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing")


# --- transforms -----------------------------------------------------------------------------------


def test_normalize_scalar_and_per_channel():
    x = np.ones((2, 3, 3), np.float32)
    assert np.allclose(Normalize(0.5, 0.25)(x), 2.0)
    out = Normalize([1.0, 0.0], [1.0, 0.5])(x)
    assert np.allclose(out[0], 0.0) and np.allclose(out[1], 2.0)
    with pytest.raises(ValueError, match="3 channel means"):
        Normalize([0, 0, 0], [1, 1, 1])(x)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize(0, 0)


def test_random_crop_is_seeded_and_in_bounds():
    image = np.arange(1 * 6 * 6, dtype=np.float32).reshape(1, 6, 6) + 1
    a, b = RandomCrop(6, padding=2, seed=5), RandomCrop(6, padding=2, seed=5)
    crops_a = [a(image) for _ in range(20)]
    crops_b = [b(image) for _ in range(20)]
    assert all(np.array_equal(p, q) for p, q in zip(crops_a, crops_b, strict=True))
    assert all(c.shape == (1, 6, 6) for c in crops_a)
    assert len({c.tobytes() for c in crops_a}) > 3  # different offsets are drawn
    for crop in crops_a:  # every crop is a window of the zero-padded image
        padded = np.pad(image, ((0, 0), (2, 2), (2, 2)))
        assert any(np.array_equal(crop, padded[:, t : t + 6, s : s + 6]) for t in range(5) for s in range(5))
    with pytest.raises(ValueError, match="larger than"):
        RandomCrop(7)(image)


def test_random_flip():
    image = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_array_equal(RandomHorizontalFlip(p=1.0)(image), image[..., ::-1])
    np.testing.assert_array_equal(RandomHorizontalFlip(p=0.0)(image), image)
    flip = RandomHorizontalFlip(p=0.5, seed=1)
    flipped = sum(not np.array_equal(flip(image), image) for _ in range(400))
    assert 150 < flipped < 250
    with pytest.raises(ValueError):
        RandomHorizontalFlip(p=1.5)


def test_compose_in_a_transformed_view(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 1, 4, 4)), y=np.arange(4))
    pipeline = Compose([RandomCrop(4, padding=1, seed=0), Normalize(1.0, 0.5)])
    view = TransformedView(NpzDataset(tmp_path / "d.npz"), pipeline)
    xb, yb = DataLoader(view, batch_size=4).next()
    assert xb.shape == (4, 1, 4, 4) and set(np.unique(xb)) <= {0.0, -2.0}
