"""Data files checked at load time, image folders and dataset factories; every file is real, written to tmp_path."""

from __future__ import annotations

import gzip
import textwrap
import uuid

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.io import savemat

from fake_datasets import WRITERS, idx_bytes, write_imagefolder, write_mnist, write_pickle
from protocol.config import DataConfig
from trainer.data.raw import DataError, MissingDataError
from trainer.data.splits import check_data, load_splits, split_indices


def _tv(dataset: str, root, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, data_root=str(root), **kw)


def _fails(cfg: DataConfig, *fragments: str, check: bool = True) -> str:
    """check_data (when ``check``) and load_splits both raise one DataError line holding every fragment."""
    calls = ([check_data] if check else []) + [lambda c: load_splits(c, seed=0)]
    for call in calls:
        with pytest.raises(DataError) as err:
            call(cfg)
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message and "pydantic" not in message, message
        missing = [f for f in fragments if f not in message]
        assert not missing, f"{missing} not in: {message}"
    if not check:
        check_data(cfg)  # the cheap check leaves these to load_splits
    return message


# ----------------------------------------------------------------------------------------------------
# MNIST idx files


def _idx(root, name: str, array: np.ndarray) -> None:
    (root / "MNIST" / "raw" / name).write_bytes(idx_bytes(array))


def _fewer_labels(root, written):
    _idx(root, "train-labels-idx1-ubyte", written["train_y"][:59].astype(np.uint8))


def _train_label_10(root, written):
    _idx(root, "train-labels-idx1-ubyte", np.full(60, 10, np.uint8))


def _test_label_12(root, written):
    y = written["test_y"].astype(np.uint8)
    y[5] = 12
    _idx(root, "t10k-labels-idx1-ubyte", y)


def _test_images_27(root, written):
    _idx(root, "t10k-images-idx3-ubyte", np.zeros((20, 27, 27), np.uint8))


def _short_header(root, written):
    (root / "MNIST/raw/train-images-idx3-ubyte").write_bytes(idx_bytes(written["train_x"])[:10])


def _truncated_data(root, written):
    (root / "MNIST/raw/train-images-idx3-ubyte").write_bytes(idx_bytes(written["train_x"])[:-100])


def _int32_images(root, written):
    data = bytearray(idx_bytes(written["train_x"]))
    data[2] = 0x0C  # idx type int32
    (root / "MNIST/raw/train-images-idx3-ubyte").write_bytes(bytes(data))


def _no_test_images(root, written):
    _idx(root, "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    _idx(root, "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (_fewer_labels, ["train-images-idx3-ubyte and ", "train-labels-idx1-ubyte: 60 images but 59 labels",
                         "expected one label per image"]),
        (_train_label_10, ["train-labels-idx1-ubyte: label 10 at index 0 (60 out of range)", "[0, 10)"]),
        (_test_label_12, ["t10k-labels-idx1-ubyte: label 12 at index 5 (1 out of range)", "[0, 10)"]),
        (_test_images_27, ["t10k-images-idx3-ubyte: images of shape (1, 27, 27)", "holds (1, 28, 28)",
                           "train-images-idx3-ubyte"]),
        (_short_header, ["train-images-idx3-ubyte: 10 bytes, too short for the 16-byte header"]),
        (_truncated_data, ["train-images-idx3-ubyte: header says shape (60, 28, 28) (47040 bytes of data)",
                           "holds 46940 bytes"]),
        (_int32_images, ["train-images-idx3-ubyte: starts with bytes 00000c03, expected 00000803"]),
        (_no_test_images, ["t10k-images-idx3-ubyte: holds no images"]),
    ],
)
def test_bad_mnist_files_name_the_file_and_the_rule(tmp_path, damage, fragments):
    written = write_mnist(tmp_path)
    damage(tmp_path, written)
    message = _fails(_tv("mnist", tmp_path), *fragments)
    assert str(tmp_path / "MNIST" / "raw") in message


@pytest.mark.parametrize("corrupt", [b"this is not gzip", "half"])
def test_corrupt_gzip_names_the_file_and_leaves_no_partial_file(tmp_path, corrupt):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    path.write_bytes(corrupt if corrupt != "half" else path.read_bytes()[: len(path.read_bytes()) // 2])
    _fails(_tv("mnist", tmp_path), f"{path}: not a readable gzip file")
    assert not (tmp_path / "MNIST/raw/train-labels-idx1-ubyte").exists()
    assert [p.name for p in (tmp_path / "MNIST/raw").iterdir() if "partial" in p.name] == []


def test_gzipped_files_are_decompressed_next_to_them_like_torchvisions_download(tmp_path):
    written = write_mnist(tmp_path, gz=True)
    check_data(_tv("mnist", tmp_path))
    plain = tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte"
    assert plain.read_bytes() == gzip.decompress(plain.with_name(plain.name + ".gz").read_bytes())
    assert np.array_equal(load_splits(_tv("mnist", tmp_path), seed=0).test_y.numpy(), written["test_y"])


# ----------------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar10(root, name: str, entry) -> None:
    write_pickle(root / "cifar-10-batches-py" / name, entry)


def _images(n: int, dtype=np.uint8) -> np.ndarray:
    return np.zeros((n, 3072), dtype=dtype)


@pytest.mark.parametrize(
    "name, entry, fragments",
    [
        ("data_batch_3", {"images": _images(12), "labels": [0] * 12},
         ["data_batch_3: holds ['images', 'labels'], expected a dict with keys 'data' and 'labels'"]),
        ("data_batch_2", [1, 2, 3], ["data_batch_2: holds a list, expected a dict"]),
        ("data_batch_1", {"data": _images(12, np.float64), "labels": [0] * 12},
         ["data_batch_1: 'data' is a ndarray of dtype float64 and shape (12, 3072)", "expected a uint8 ndarray"]),
        ("data_batch_4", {"data": _images(12)[:, :3000], "labels": [0] * 12},
         ["data_batch_4: 'data' is a ndarray of dtype uint8 and shape (12, 3000)", "(n, 3072)"]),
        ("data_batch_5", {"data": _images(12), "labels": [0.5] * 12}, ["data_batch_5: 'labels' is", "int labels"]),
        ("test_batch", {"data": _images(20), "labels": [0] * 19},
         ["test_batch: 20 images but 19 labels, expected one label per image"]),
        ("test_batch", {"data": _images(20), "labels": [0] * 19 + [10]},
         ["test_batch: label 10 at index 19 (1 out of range), expected labels in [0, 10)"]),
        ("batches.meta", {"label_names": ["a"] * 9}, ["batches.meta: 9 class names under 'label_names', expected 10"]),
        ("batches.meta", {"names": []}, ["batches.meta: no list of class names under 'label_names'"]),
    ],
)
def test_bad_cifar10_pickles_name_the_file_and_the_rule(tmp_path, name, entry, fragments):
    WRITERS["cifar10"](tmp_path)
    _cifar10(tmp_path, name, entry)
    _fails(_tv("cifar10", tmp_path), str(tmp_path / "cifar-10-batches-py" / name), *fragments)


class _Planted:
    """Unpickling this calls ``os.system``: what a hostile data folder would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_cifar_pickle_is_refused_without_running_code(tmp_path):
    WRITERS["cifar10"](tmp_path)
    marker = tmp_path / "ran"
    _cifar10(tmp_path, "data_batch_2", {"data": _Planted(marker), "labels": [0]})
    _fails(_tv("cifar10", tmp_path), "data_batch_2: not a readable pickle", "refused global posix.system")
    assert not marker.exists()


def test_a_gzip_that_decompresses_past_the_cap_is_refused(tmp_path, monkeypatch):
    import trainer.data.formats

    write_mnist(tmp_path, gz=True)
    monkeypatch.setattr(trainer.data.formats, "GUNZIP_MAX_BYTES", 10_000)  # the training images are 47,056 bytes
    _fails(_tv("mnist", tmp_path), "train-images-idx3-ubyte.gz: decompresses to more than 0 MiB")


def test_cifar_file_that_is_no_pickle(tmp_path):
    WRITERS["cifar10"](tmp_path)
    (tmp_path / "cifar-10-batches-py/test_batch").write_bytes(b"\x00garbage")
    _fails(_tv("cifar10", tmp_path), "test_batch: not a readable pickle", "expected a CIFAR python pickle")


def test_cifar100_needs_fine_labels_in_range(tmp_path):
    written = WRITERS["cifar100"](tmp_path)
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "test", {"data": written["test_x"].reshape(100, -1), "labels": [0] * 100})
    _fails(_tv("cifar100", tmp_path), f"{folder / 'test'}: holds ['data', 'labels']", "'fine_labels'")
    write_pickle(folder / "test", {"data": written["test_x"].reshape(100, -1), "fine_labels": [100] + [0] * 99})
    _fails(_tv("cifar100", tmp_path), f"{folder / 'test'}: label 100 at index 0", "[0, 100)")


# ----------------------------------------------------------------------------------------------------
# SVHN .mat files


def _svhn(root, split: str, x: np.ndarray, y: np.ndarray) -> None:
    savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})


@pytest.mark.parametrize(
    "split, x, y, fragments",
    [
        ("train", np.zeros((32, 32, 3, 60), np.uint8), np.full((60, 1), 11.0),
         ["train_32x32.mat: label 11 at index 0 (60 out of range)", "[0, 10)"]),
        ("test", np.zeros((32, 32, 3, 20), np.uint8), np.ones((19, 1)),
         ["test_32x32.mat: 20 images but 19 labels"]),
        ("train", np.zeros((32, 32, 3, 60)), np.ones((60, 1)),
         ["train_32x32.mat: 'X' is double of shape (32, 32, 3, 60), expected uint8 of shape (H, W, C, n)"]),
        ("test", np.zeros((30, 30, 3, 20), np.uint8), np.ones((20, 1)),
         ["test_32x32.mat: images of shape (3, 30, 30)", "holds (3, 32, 32)"]),
        ("test", np.zeros((32, 32, 3, 20), np.uint8), np.full((20, 1), 1.5), ["test_32x32.mat: 'y' is", "whole"]),
    ],
)
def test_bad_svhn_files_name_the_file_and_the_rule(tmp_path, split, x, y, fragments):
    WRITERS["svhn"](tmp_path)
    _svhn(tmp_path, split, x, y)
    _fails(_tv("svhn", tmp_path), str(tmp_path / f"{split}_32x32.mat"), *fragments)


def test_svhn_file_that_is_no_mat_file_or_lacks_a_variable(tmp_path):
    WRITERS["svhn"](tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage" * 20)
    _fails(_tv("svhn", tmp_path), "test_32x32.mat: not a readable MATLAB file")
    savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 20), np.uint8)})
    _fails(_tv("svhn", tmp_path), "test_32x32.mat: holds variables ['X'], expected 'X' and 'y'")


def test_svhn_images_cut_short_are_found_by_the_full_load(tmp_path):
    """The cheap check reads the .mat headers and labels only; torchvision's full read names the file."""
    WRITERS["svhn"](tmp_path)
    path = tmp_path / "test_32x32.mat"
    savemat(str(path), {"y": np.ones((20, 1)), "X": np.zeros((32, 32, 3, 20), np.uint8)})
    path.write_bytes(path.read_bytes()[:-500])
    _fails(_tv("svhn", tmp_path), f"{path}: torchvision's SVHN('{tmp_path}', split='test') failed: OSError",
           check=False)


# ----------------------------------------------------------------------------------------------------
# check_data, imbalance


@pytest.mark.parametrize("dataset", list(WRITERS))
def test_check_data_passes_good_files_and_names_a_missing_one(tmp_path, dataset):
    WRITERS[dataset](tmp_path)
    assert check_data(_tv(dataset, tmp_path)) is None
    victim = next(p for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.name.endswith("meta"))
    victim.unlink()
    with pytest.raises(MissingDataError, match="--download") as err:
        check_data(_tv(dataset, tmp_path))
    assert str(victim) in str(err.value) and isinstance(err.value, FileNotFoundError)


def test_check_data_leaves_missing_files_to_download_and_fetches_nothing(tmp_path):
    assert check_data(_tv("cifar10", tmp_path, download=True)) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match=r"data_root \(--data-root\) must be set"):
        check_data(DataConfig(dataset="svhn"))


@pytest.mark.parametrize("dataset", ["mnist5k", "digits", "synthetic"])
def test_check_data_passes_built_in_sets(dataset):
    assert check_data(DataConfig(dataset=dataset)) is None


def test_imbalance_that_empties_train_names_both_options():
    cfg = DataConfig(dataset="digits", imbalance_classes=1.0, imbalance_drop=1.0)
    message = _fails(cfg, "imbalance_classes == 1.0 and imbalance_drop == 1.0 remove", "'digits'",
                     "lower --imbalance-classes or --imbalance-drop")
    assert "all 1258 training examples" in message  # load_splits counts them: 1797 - 359 test - 180 val
    check_data(DataConfig(dataset="digits", imbalance_classes=0.9, imbalance_drop=1.0))  # one class is left


# ----------------------------------------------------------------------------------------------------
# imagefolder:PATH


def _normalised(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``x`` uint8 scaled to [0, 1] and normalised per channel with ``reference``'s statistics."""
    ref = reference.astype(np.float32) / 255
    mean = ref.mean(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    std = ref.std(axis=(0, 2, 3), dtype=np.float64)[None, :, None, None]
    return (x.astype(np.float32) / 255 - mean) / std


def test_imagefolder_round_trip_with_its_own_test_split(tmp_path):
    written = write_imagefolder(tmp_path, {"train": 4, "test": 2})
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path}")
    check_data(cfg)
    s = load_splits(cfg, seed=1)
    assert (s.name, s.n_classes, s.in_shape, s.augment) == (f"imagefolder:{tmp_path}", 3, (3, 6, 5), False)
    train, val, _ = split_indices(written["train_y"], 0, 1, seed=1)  # val: round(0.1 * 12) == 1 of train
    reference = written["train_x"][train]
    assert np.array_equal(s.train_y.numpy(), written["train_y"][train])
    assert np.array_equal(s.val_y.numpy(), written["train_y"][val])
    assert np.array_equal(s.test_y.numpy(), written["test_y"])
    np.testing.assert_allclose(s.train_x.numpy(), _normalised(reference, reference), atol=1e-4)
    np.testing.assert_allclose(s.test_x.numpy(), _normalised(written["test_x"], reference), atol=1e-4)


def test_imagefolder_without_val_and_test_splits_by_the_fractions_with_the_seed(tmp_path):
    write_imagefolder(tmp_path, {"train": 10})
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path}")
    a, b, c = (load_splits(cfg, seed=s) for s in (3, 3, 4))
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (21, 3, 6)  # 30 images: 20% test, 10% val
    assert torch.bincount(a.test_y).tolist() == [2, 2, 2]  # stratified
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)


def test_imagefolder_uses_its_val_and_test_folders_as_they_are(tmp_path):
    written = write_imagefolder(tmp_path, {"train": 3, "val": 2, "test": 1})
    s = load_splits(DataConfig(dataset=f"imagefolder:{tmp_path}"), seed=0)
    assert np.array_equal(s.train_y.numpy(), written["train_y"])
    assert np.array_equal(s.val_y.numpy(), written["val_y"]) and np.array_equal(s.test_y.numpy(), written["test_y"])


def test_imagefolder_images_of_other_sizes_need_image_size(tmp_path):
    write_imagefolder(tmp_path, {"train": 3, "test": 1})
    write_imagefolder(tmp_path / "other", {"test": 1}, classes=("dog",), size=(7, 7))
    odd = tmp_path / "test/dog/999.png"
    (tmp_path / "other/test/dog/000.png").rename(odd)
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path}")
    _fails(cfg, f"{odd}: image of 7x7 pixels, but {tmp_path / 'train/cat/000.png'} has 5x6",
           "set image_size (--image-size)", check=False)
    s = load_splits(DataConfig(dataset=f"imagefolder:{tmp_path}", image_size=4), seed=0)
    assert s.in_shape == (3, 4, 4) and len(s.test_y) == 4


def test_imagefolder_class_folders_must_agree(tmp_path):
    write_imagefolder(tmp_path, {"train": 2})
    write_imagefolder(tmp_path, {"test": 1}, classes=("cat", "dog"))
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"),
           f"{tmp_path / 'test'}: class folders differ from {tmp_path / 'train'}'s (missing ['emu'], extra [])")
    write_imagefolder(tmp_path, {"val": 1}, classes=("cat", "dog", "emu", "fox"))
    write_imagefolder(tmp_path, {"test": 1})
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), "val: class folders differ", "extra ['fox']")


def test_imagefolder_bad_layouts(tmp_path):
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), f"{tmp_path / 'train'} is not a folder")
    (tmp_path / "train").mkdir()
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), "Couldn't find any class folder",
           "expected one folder of image files per class")
    write_imagefolder(tmp_path, {"train": 2})
    (tmp_path / "train/fox").mkdir()
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), "Found no valid file for the classes fox")


def test_imagefolder_unreadable_image_is_found_when_loading(tmp_path):
    write_imagefolder(tmp_path, {"train": 3})
    (tmp_path / "train/dog/001.png").write_bytes(b"not a png")
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), f"{tmp_path / 'train/dog/001.png'}: not a readable image",
           check=False)


def test_too_few_examples_for_the_fractions(tmp_path):
    write_imagefolder(tmp_path, {"train": 1}, classes=("a", "b"))
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), "2 training examples are too few to hold out 1 for test "
           "and 1 for validation", check=False)


def test_a_symlink_into_another_class_folder_is_refused(tmp_path):
    write_imagefolder(tmp_path, {"train": 4})
    (tmp_path / "train" / "cat" / "loop").symlink_to(tmp_path / "train" / "dog")  # dogs that would be labelled cat
    _fails(DataConfig(dataset=f"imagefolder:{tmp_path}"), "outside its class folder", "train/dog", "(a symlink)")


def test_image_size_is_for_imagefolder_only():
    with pytest.raises(ValidationError, match="image_size == 8 applies to imagefolder:PATH data sets only"):
        DataConfig(dataset="digits", image_size=8)
    with pytest.raises(ValidationError, match="image_size"):
        DataConfig(dataset="imagefolder:/x", image_size=0)


# ----------------------------------------------------------------------------------------------------
# package.module:function


def _factory(tmp_path, monkeypatch, body: str) -> str:
    """Write ``body`` (defining ``make``) as a fresh importable module; return its ``module:make``."""
    name = f"factory_{uuid.uuid4().hex[:10]}"
    header = "import numpy as np\nimport torch\nfrom torch.utils.data import Dataset, TensorDataset\n"
    (tmp_path / f"{name}.py").write_text(header + textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:make"


GOOD = """
    def make():
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(50, 2, 4, 4, generator=g), torch.arange(50) % 4
        return TensorDataset(x[:40], y[:40]), None, TensorDataset(x[40:], y[40:])
"""


def test_factory_round_trip_and_split(tmp_path, monkeypatch):
    spec = _factory(tmp_path, monkeypatch, GOOD)
    check_data(DataConfig(dataset=spec))
    s = load_splits(DataConfig(dataset=spec), seed=0)
    x = torch.rand(50, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 4
    assert (s.name, s.n_classes, s.in_shape, s.augment) == (spec, 4, (2, 4, 4), False)
    assert (len(s.train_y), len(s.val_y)) == (36, 4) and torch.equal(s.test_y, y[40:])
    train, _, _ = split_indices(y[:40].numpy(), 0, 4, seed=0)
    mean = x[:40][train].mean(dim=(0, 2, 3), keepdim=True).double()
    std = x[:40][train].double().std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    torch.testing.assert_close(s.test_x.double(), (x[40:] - mean) / std, atol=1e-4, rtol=0)


def test_factory_with_classes_numpy_items_and_flat_inputs(tmp_path, monkeypatch):
    spec = _factory(tmp_path, monkeypatch, """
        class Rows(Dataset):
            classes = ["a", "b", "c", "d", "e"]
            def __len__(self):
                return 30
            def __getitem__(self, i):
                return np.full(6, i, dtype=np.float64), np.int64(i % 3)
        def make():
            return Rows(), Rows(), None
    """)
    s = load_splits(DataConfig(dataset=spec), seed=0)
    assert s.n_classes == 5 and s.in_shape == (1, 1, 6) and len(s.val_y) == 30 and len(s.train_y) == 24


BAD_FACTORIES = [
    ("make = 3", ["'make' is an int, expected a function called with no arguments"], True),
    ("def other():\n    pass", ["has no attribute 'make'"], True),
    ("import no_such_module_for_data", ["cannot import", "ModuleNotFoundError: No module named"], True),
    ("def make():\n    raise OSError('disk gone')", ["raised OSError: disk gone"], False),
    ("def make():\n    return TensorDataset(torch.zeros(4, 3), torch.zeros(4)), None",
     ["returned a tuple, expected a tuple (train, val, test) of map-style Datasets"], False),
    ("def make():\n    return 5, None, None", ["train is an int, expected a map-style Dataset"], False),
    ("def make():\n    return [torch.zeros(3)] * 4, None, None",
     ["train[0] is a Tensor of dtype torch.float32 and shape (3,), expected an (input, int label) pair"], False),
    ("def make():\n    return [(torch.zeros(3), 1.0)] * 4, None, None",
     ["train[0]: label is a float (1.0), expected an int"], False),
    ("def make():\n    return [(torch.zeros(3), True)] * 4, None, None", ["train[0]: label is a bool"], False),
    ("def make():\n    return [('abc', 1)] * 4, None, None",
     ["train[0]: input is a str, expected a tensor-like"], False),
    ("def make():\n    return [(torch.zeros(3), i - 1) for i in range(9)], None, None",
     ["train (n_classes 8 from 1 + the largest label): label -1 at index 0"], False),
    ("class D(list):\n    classes = ['a', 'b']\n"
     "def make():\n    return D((torch.zeros(3), i) for i in range(9)), None, None",
     ["train (n_classes 2 from len(train.classes)): label 2 at index 2 (7 out of range)", "[0, 2)"], False),
    ("def make():\n    return [], None, None", ["train is empty, expected at least one (input, label) item"], False),
    ("class D(list):\n    def __getitem__(self, i):\n        if i == 3:\n            raise OSError('disk read error')\n"
     "        return (torch.zeros(3), i % 2)\n"
     "def make():\n    return D([0] * 9), None, None", ["reading train[3] raised OSError: disk read error"], False),
    ("def make():\n    return [(torch.zeros(3), 0)] * 9, [], None", ["val is empty", "return None to split it"], False),
    ("def make():\n    return [(torch.zeros(3), 0)] * 3 + [(torch.zeros(4), 0)], None, None",
     ["train[3] has shape (1, 1, 4) (as (C, H, W)), expected (1, 1, 3)"], False),
    ("def make():\n    return [(torch.zeros(3), 0)] * 9, None, [(torch.zeros(2, 3), 0)]",
     ["test[0] has shape (1, 2, 3) (as (C, H, W)), expected (1, 1, 3) like train[0]"], False),
    ("def make():\n    return [(torch.zeros(2, 2, 2, 2), 0)] * 9, None, None",
     ["train[0]: input of shape (2, 2, 2, 2), expected (C, H, W), (H, W) or (D,)"], False),
]


@pytest.mark.parametrize("body, fragments, found_by_check", BAD_FACTORIES)
def test_bad_factories_are_named_with_the_rule(tmp_path, monkeypatch, body, fragments, found_by_check):
    spec = _factory(tmp_path, monkeypatch, body)
    _fails(DataConfig(dataset=spec), f"dataset factory {spec!r}", *fragments, check=found_by_check)


@pytest.mark.parametrize("body, fragments", [
    ("def make():\n    x = torch.rand(20, 3)\n    x[4, 1] = float('nan')\n    x[7, 0] = float('inf')\n"
     "    return TensorDataset(x, torch.arange(20) % 2), None, None",
     ["2 train examples hold NaN or inf inputs; inputs must be finite"]),
    ("def make():\n    return TensorDataset(torch.rand(20, 3), torch.zeros(20, dtype=torch.long)), None, None",
     ["the training split has 1 class(es) (labels [0])", "at least 2 classes"]),
    ("def make():\n    y = torch.arange(20) % 3\n    y[5] = 10**6\n"
     "    return TensorDataset(torch.rand(20, 3), y), None, None",
     ["labels go up to 1000000 but only 4 classes have training examples", "labels must be 0 .. C-1"]),
])
def test_silently_wrong_data_is_refused(tmp_path, monkeypatch, body, fragments):
    """NaN inputs, a single class (every accuracy 100 %) and a stray huge label (a million-output model)."""
    spec = _factory(tmp_path, monkeypatch, body)
    _fails(DataConfig(dataset=spec), f"dataset {spec!r}", *fragments, check=False)


def test_check_data_does_not_call_the_factory(tmp_path, monkeypatch):
    marker = tmp_path / "called"
    spec = _factory(tmp_path, monkeypatch, f"""
        def make():
            open({str(marker)!r}, "w").close()
            return [(torch.zeros(3), i % 2) for i in range(20)], None, None
    """)
    check_data(DataConfig(dataset=spec))
    assert not marker.exists()
    assert load_splits(DataConfig(dataset=spec), seed=0).n_classes == 2 and marker.exists()


def test_missing_factory_module_is_found_by_check_data():
    message = r"dataset factory 'nowhere_pkg\.data:make': cannot import 'nowhere_pkg\.data'"
    with pytest.raises(DataError, match=message):
        check_data(DataConfig(dataset="nowhere_pkg.data:make"))
