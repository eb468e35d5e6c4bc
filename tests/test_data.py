"""Data loading: shapes, splits, normalisation, torchvision layouts, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.datasets

from protocol.config import DataConfig
from fake_datasets import WRITERS, write_mnist
from trainer.data.sources import make_synthetic
from trainer.data.splits import augment_batch, load_splits, split_indices

OFFLINE = {  # dataset: (in_shape, total examples)
    "mnist5k": ((1, 28, 28), 5000),
    "digits": ((1, 8, 8), 1797),
    "synthetic": ((1, 8, 8), 300),
}


@pytest.fixture(scope="module")
def mnist5k():
    return load_splits(DataConfig(dataset="mnist5k"), seed=0)


def _cfg(dataset: str, **kw) -> DataConfig:
    if dataset == "synthetic":
        kw.setdefault("synthetic_n", 300)
    return DataConfig(dataset=dataset, **kw)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


# ----------------------------------------------------------------------------------------------------
# offline data sets


@pytest.mark.parametrize("dataset", list(OFFLINE))
def test_offline_shapes_dtypes_and_sizes(dataset, mnist5k):
    in_shape, n_total = OFFLINE[dataset]
    s = mnist5k if dataset == "mnist5k" else load_splits(_cfg(dataset), seed=0)
    assert s.name == dataset and s.in_shape == in_shape and s.n_classes == 10 and s.augment is False
    n_test, n_val = round(0.2 * n_total), round(0.1 * n_total)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (n_total - n_test - n_val, n_val, n_test)
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.float32 and x.shape[1:] == in_shape and len(x) == len(y)
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10


def test_mnist5k_sizes_and_stratification(mnist5k):
    assert (len(mnist5k.train_y), len(mnist5k.val_y), len(mnist5k.test_y)) == (3500, 500, 1000)
    assert torch.bincount(mnist5k.test_y).tolist() == [100] * 10
    assert torch.bincount(mnist5k.val_y).tolist() == [50] * 10


@pytest.mark.parametrize("dataset", ["mnist5k", "synthetic"])
def test_splits_are_disjoint(dataset, mnist5k):
    s = mnist5k if dataset == "mnist5k" else load_splits(_cfg(dataset), seed=0)
    train, val, test = _rows(s.train_x), _rows(s.val_x), _rows(s.test_x)
    assert not (train & val) and not (train & test) and not (val & test)


def test_split_indices_partition_and_stratify():
    y = np.repeat(np.arange(5), 40)  # 200 labels, 40 per class
    train, val, test = split_indices(y, n_test=50, n_val=20, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(200))
    assert (len(train), len(val), len(test)) == (130, 20, 50)
    assert np.bincount(y[test]).tolist() == [10] * 5 and np.bincount(y[val]).tolist() == [4] * 5


def test_split_indices_too_small_for_stratification_still_splits():
    y = np.arange(20) % 10  # 2 per class, 3 held out: cannot hold every class
    train, val, test = split_indices(y, n_test=0, n_val=3, seed=0)
    assert (len(train), len(val), len(test)) == (17, 3, 0)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_same_seed_same_splits_other_seed_other_splits(dataset):
    a, b, c = (load_splits(_cfg(dataset), seed=s) for s in (7, 7, 8))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_train_split_is_normalised(dataset):
    s = load_splits(_cfg(dataset), seed=0)
    assert s.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (s.train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    assert s.val_x.mean().abs() > 0  # statistics come from train only, not recomputed per split


def test_mnist5k_normalised_with_train_stats(mnist5k):
    assert abs(float(mnist5k.train_x.mean())) < 1e-4
    assert abs(float(mnist5k.train_x.std()) - 1) < 1e-3


def test_synthetic_is_deterministic_and_learnable():
    x, y = make_synthetic(500, seed=1)
    x2, y2 = make_synthetic(500, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and x.shape == (500, 1, 8, 8)
    assert np.bincount(y).tolist() == [50] * 10
    flat = x.reshape(500, -1)
    centroids = np.stack([flat[:250][y[:250] == k].mean(0) for k in range(10)])  # fit on half
    pred = np.argmin(((flat[250:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[250:]).mean() > 0.9


def test_augment_resolution():
    assert load_splits(_cfg("synthetic", augment=True), seed=0).augment is True
    assert load_splits(_cfg("digits"), seed=0).augment is False


# ----------------------------------------------------------------------------------------------------
# torchvision layouts


def _expected(written: dict, n_val_fraction: float, seed: int):
    """What load_splits should return for the written files: reproduce split, scale and normalisation."""
    train_x = written["train_x"]
    if train_x.ndim == 3:
        train_x, test_x = train_x[:, None], written["test_x"][:, None]
    else:
        test_x = written["test_x"]
    n_val = max(1, round(n_val_fraction * len(train_x)))
    train, val, _ = split_indices(written["train_y"], 0, n_val, seed)
    tr = train_x[train].astype(np.float32) / 255
    mean = tr.mean(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    std = tr.std(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    norm = lambda a: (a.astype(np.float32) / 255 - mean) / std  # noqa: E731
    return norm(train_x[train]), written["train_y"][train], norm(test_x), written["test_y"]


@pytest.mark.parametrize(
    "dataset, in_shape, n_classes, augment",
    [
        ("mnist", (1, 28, 28), 10, False),
        ("fashion-mnist", (1, 28, 28), 10, False),
        ("cifar10", (3, 32, 32), 10, True),
        ("cifar100", (3, 32, 32), 100, True),
        ("svhn", (3, 32, 32), 10, True),
    ],
)
def test_torchvision_layout_round_trip(tmp_path, dataset, in_shape, n_classes, augment):
    written = WRITERS[dataset](tmp_path, seed=5)
    s = load_splits(DataConfig(dataset=dataset, data_root=str(tmp_path)), seed=2)
    assert (s.in_shape, s.n_classes, s.augment) == (in_shape, n_classes, augment)
    n_train = len(written["train_y"])
    assert len(s.train_y) + len(s.val_y) == n_train and len(s.test_y) == len(written["test_y"])
    train_x, train_y, test_x, test_y = _expected(written, 0.1, seed=2)
    assert np.array_equal(s.train_y.numpy(), train_y) and np.array_equal(s.test_y.numpy(), test_y)
    np.testing.assert_allclose(s.train_x.numpy(), train_x, atol=1e-4)
    np.testing.assert_allclose(s.test_x.numpy(), test_x, atol=1e-4)


def test_mnist_gzipped_files_load(tmp_path):
    written = write_mnist(tmp_path, gz=True, seed=1)
    s = load_splits(DataConfig(dataset="mnist", data_root=str(tmp_path)), seed=0)
    assert np.array_equal(s.test_y.numpy(), written["test_y"])


def test_svhn_zero_digit_label(tmp_path):
    written = WRITERS["svhn"](tmp_path, seed=0)
    s = load_splits(DataConfig(dataset="svhn", data_root=str(tmp_path)), seed=0)
    assert 0 in written["test_y"] and int(s.test_y.max()) <= 9
    assert torch.bincount(s.test_y, minlength=10).tolist() == np.bincount(written["test_y"]).tolist()


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_files_name_the_path(tmp_path, dataset, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_splits(DataConfig(dataset=dataset, data_root=str(tmp_path)), seed=0)
    message = str(err.value)
    assert str(tmp_path / expected) in message and "--download" in message and dataset in message


def test_partly_missing_files_name_the_missing_one(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_splits(DataConfig(dataset="mnist", data_root=str(tmp_path)), seed=0)


def test_torchvision_dataset_without_root_is_a_value_error():
    with pytest.raises(ValueError, match="data_root.*--data-root"):
        load_splits(DataConfig(dataset="cifar10"), seed=0)


def test_download_asks_torchvision_for_missing_files(tmp_path, monkeypatch):
    """Only torchvision's network step is replaced: its MNIST class still reads what the download wrote."""
    calls = []

    def offline_download(self):
        calls.append(self.root)
        write_mnist(self.root, seed=0)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline_download)
    s = load_splits(DataConfig(dataset="mnist", data_root=str(tmp_path), download=True), seed=0)
    assert calls == [str(tmp_path)] and len(s.test_y) == 20
    with pytest.raises(FileNotFoundError):  # without download=True nothing is fetched
        load_splits(DataConfig(dataset="mnist", data_root=str(tmp_path / "elsewhere")), seed=0)
    assert calls == [str(tmp_path)]


# ----------------------------------------------------------------------------------------------------
# augmentation


def _batch(n: int = 16, shape=(3, 12, 10)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def test_augment_keeps_shape_and_is_seeded():
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    c = augment_batch(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_augment_output_is_a_padded_crop_or_its_mirror():
    x = _batch(n=32)
    out = augment_batch(x, torch.Generator().manual_seed(4))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    height, width = x.shape[2:]
    flips = 0
    for i in range(len(x)):
        views = {
            (dy, dx, flip): padded[i, :, dy : dy + height, dx : dx + width].flip(-1) if flip
            else padded[i, :, dy : dy + height, dx : dx + width]
            for dy in range(9) for dx in range(9) for flip in (False, True)
        }
        found = [k for k, v in views.items() if torch.equal(v, out[i])]
        assert found, f"example {i} is no crop of its padded input"
        flips += found[0][2]
    assert 0 < flips < len(x)


@pytest.mark.parametrize("dataset", list(WRITERS))
def test_fake_files_read_the_same_with_torchvision(tmp_path, dataset, monkeypatch):
    """The fake files are in torchvision's layout: its own classes (md5 checks off) read the same data."""
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)
    written = WRITERS[dataset](tmp_path, seed=3)
    cls = {
        "mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
        "svhn": torchvision.datasets.SVHN,
    }[dataset]
    split = {"split": "test"} if dataset == "svhn" else {"train": False}
    theirs = cls(str(tmp_path), **split)
    images = np.asarray(theirs.data)
    if dataset.startswith("cifar"):
        images = images.transpose(0, 3, 1, 2)  # torchvision keeps CIFAR as (n, H, W, C)
    labels = np.asarray(theirs.labels if dataset == "svhn" else theirs.targets)
    assert np.array_equal(images, written["test_x"]) and np.array_equal(labels, written["test_y"])


# --- class imbalance ----------------------------------------------------------------------------

from trainer.data.splits import make_imbalanced  # noqa: E402


def test_imbalance_counts_are_exact_and_only_train_changes():
    balanced = load_splits(DataConfig(dataset="mnist5k"), seed=0)
    imbalanced = load_splits(DataConfig(dataset="mnist5k", imbalance_classes=0.3, imbalance_drop=0.9), seed=0)
    record = imbalanced.imbalance
    assert balanced.imbalance is None and len(record["classes"]) == 3
    before = torch.bincount(balanced.train_y, minlength=10)
    after = torch.bincount(imbalanced.train_y, minlength=10)
    for c in range(10):
        if c in record["classes"]:
            assert record["dropped"][c] == round(0.9 * int(before[c]))
            assert int(after[c]) == int(before[c]) - record["dropped"][c]
        else:
            assert int(after[c]) == int(before[c])
    assert record["n_dropped"] == int(before.sum() - after.sum()) and record["n_kept"] == len(imbalanced.train_y)
    assert torch.equal(balanced.test_y, imbalanced.test_y) and torch.equal(balanced.val_y, imbalanced.val_y)
    # normalisation uses the imbalanced train split's statistics, so compare test images up to affine maps
    assert torch.equal(balanced.test_x.argmax(dim=-1), imbalanced.test_x.argmax(dim=-1))


def test_imbalance_is_seeded():
    y = np.arange(1000) % 10
    keep_a, rec_a = make_imbalanced(y, 10, 0.3, 0.9, seed=1)
    keep_b, rec_b = make_imbalanced(y, 10, 0.3, 0.9, seed=1)
    _, rec_c = make_imbalanced(y, 10, 0.3, 0.9, seed=2)
    assert np.array_equal(keep_a, keep_b) and rec_a == rec_b and rec_a["classes"] != rec_c["classes"]
    assert make_imbalanced(y, 10, 0.0, 0.9, seed=1)[1] is None
