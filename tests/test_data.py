from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from escapelab import data as data_module
from escapelab.config import DataConfig, SyntheticConfig, load_config
from escapelab.data import load_dataset, stratified_subset
from escapelab.errors import ConfigError, DataError


def test_digits_split_is_fixed_stratified_and_standardized():
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.x_train.shape == (1257, 1, 8, 8) and ds.x_test.shape == (540, 1, 8, 8)
    assert ds.num_classes == 10
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert np.all(np.abs(counts - 0.3 * per_class) <= 1)  # stratified 30% test split
    x = ds.x_train.double()
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-3)
    again = load_dataset(DataConfig(name="digits"))
    assert np.array_equal(ds.y_test.numpy(), again.y_test.numpy())
    other = load_dataset(DataConfig(name="digits", split_seed=1))
    assert not np.array_equal(ds.y_test.numpy(), other.y_test.numpy())


def test_stratified_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 500)
    a = stratified_subset(labels, 1000, seed=0)
    assert len(a) == 1000 and len(set(a)) == 1000
    assert np.all(np.bincount(labels[a]) == 100)
    assert np.array_equal(a, stratified_subset(labels, 1000, seed=0))
    assert np.array_equal(stratified_subset(labels, 5000, 0), np.arange(5000))
    # A run's probe seed is a 63-bit stream seed; scikit-learn alone refuses those.
    big = stratified_subset(labels, 1000, seed=2**62 + 7)
    assert np.all(np.bincount(labels[big]) == 100)
    assert np.array_equal(big, stratified_subset(labels, 1000, seed=2**62 + 7))
    assert not np.array_equal(big, stratified_subset(labels, 1000, seed=2**62 + 8))


def test_synthetic_and_subset():
    cfg = DataConfig(name="synthetic", subset=60, normalize=False,
                     synthetic=SyntheticConfig(n_train=100, n_test=40, n_classes=4, channels=3,
                                               size=6, noise=0.0))
    ds = load_dataset(cfg)
    assert ds.x_train.shape == (60, 3, 6, 6) and np.all(np.bincount(ds.y_train) == 15)
    # Without noise every image is its class prototype.
    for c in range(4):
        group = ds.x_train[ds.y_train == c]
        assert float((group - group[0]).abs().max()) == 0.0


# -- CIFAR in the official format --------------------------------------------------------

def _batch(n, seed, label_key=b"labels", classes=10):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        label_key: [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def _write_cifar10(root, n=12, tamper=None, as_folder=False):
    folder = "cifar-10-batches-py"
    files = {f"data_batch_{i}": _batch(n, i) for i in range(1, 6)}
    files["test_batch"] = _batch(n, 9)
    payloads = {name: pickle.dumps(obj, protocol=2) for name, obj in files.items()}
    payloads["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    if tamper:
        payloads.update(tamper)
    if as_folder:
        (root / folder).mkdir(parents=True)
        for name, data in payloads.items():
            (root / folder / name).write_bytes(data)
    else:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, data in payloads.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return files


@pytest.mark.parametrize("as_folder", [False, True])
def test_reads_a_cifar10_archive_in_the_official_format(tmp_path, as_folder):
    files = _write_cifar10(tmp_path, as_folder=as_folder)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), verify_md5=False,
                                 download=False, normalize=False))
    assert ds.x_train.shape == (60, 3, 32, 32) and ds.x_test.shape == (12, 3, 32, 32)
    first = files["data_batch_1"]
    # Row layout of the official files: 1024 red, then green, then blue, row-major.
    raw = first[b"data"][3]
    assert float(ds.x_train[3, 1, 2, 5]) == pytest.approx(raw[1024 + 2 * 32 + 5] / 255)
    assert ds.y_train[:12].tolist() == first[b"labels"]
    assert ds.y_test.tolist() == files["test_batch"][b"labels"]


def test_cifar_md5_is_checked(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(DataError, match="md5"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_before_it_runs(tmp_path):
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2)
    _write_cifar10(tmp_path, tamper={"data_batch_3": payload})
    with pytest.raises(DataError, match="refusing to load global"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), verify_md5=False,
                                download=False))
    assert not evil.marker.exists()


@pytest.mark.parametrize("bad", [
    {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
    {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    [1, 2, 3],
])
def test_malformed_batches_are_refused(tmp_path, bad):
    _write_cifar10(tmp_path, tamper={"test_batch": pickle.dumps(bad, protocol=2)})
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), verify_md5=False,
                                download=False))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, seed in (("train", 1), ("test", 2)):
        obj = _batch(8, seed, label_key=b"fine_labels", classes=100)
        obj[b"coarse_labels"] = [0] * 8
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
    assert ds.num_classes == 100 and ds.x_train.shape == (8, 3, 32, 32)


def test_missing_cifar_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ESCAPELAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="cifar10", download=False))
    text = str(info.value)
    assert "cifar-10-python.tar.gz" in text and "nowhere" in text
    assert "c58f30108f718f92721af3b95e74349a" in text


def test_download_is_md5_checked(tmp_path, monkeypatch):
    import dataclasses

    from escapelab import data as data_module

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _write_cifar10(mirror)
    archive = mirror / "cifar-10-python.tar.gz"
    spec = data_module.CIFAR_SPECS["cifar10"]
    monkeypatch.setattr(type(spec), "url", property(lambda self: archive.as_uri()))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_dataset(DataConfig(name="cifar10", root=str(root)))
    assert not list(root.glob("*"))  # a bad download leaves nothing behind
    good = dataclasses.replace(spec, md5=data_module._md5(archive))
    monkeypatch.setitem(data_module.CIFAR_SPECS, "cifar10", good)
    ds = load_dataset(DataConfig(name="cifar10", root=str(root)))
    assert ds.x_train.shape == (60, 3, 32, 32)
    assert (root / "cifar-10-python.tar.gz").is_file()


# -- MNIST / Fashion-MNIST in the official IDX format -------------------------------------

TRAIN_X, TRAIN_Y = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_X, TEST_Y = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def _idx_images(pixels):
    n, h, w = pixels.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + pixels.astype(np.uint8).tobytes()


def _idx_labels(labels):
    return struct.pack(">II", 0x00000801, len(labels)) + bytes(int(v) for v in labels)


def _idx_release(seed, n_train=20, n_test=10):
    """Raw bytes of the four files plus the arrays they hold (every class in both splits)."""
    rng = np.random.default_rng(seed)
    arrays = {TRAIN_X: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              TRAIN_Y: rng.permutation(np.arange(n_train) % 10),
              TEST_X: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              TEST_Y: rng.permutation(np.arange(n_test) % 10)}
    raw = {name: (_idx_images(a) if a.ndim == 3 else _idx_labels(a)) for name, a in arrays.items()}
    return raw, arrays


def _write_idx(folder, raw, compress=None):
    """compress: None (raw files), 'release' (gzip -9, mtime 0) or 'debian' (re-compressed
    at another level and time: other .gz bytes, the same content)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in raw.items():
        if compress is None:
            (folder / name).write_bytes(payload)
        else:
            level, mtime = (9, 0) if compress == "release" else (1, 1591315200)
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload, level, mtime=mtime))


@pytest.fixture
def idx_md5(monkeypatch):
    """Make the MD5s of synthetic files the 'official' ones; no Debian folder is seen."""
    def use(name, raw):
        monkeypatch.setitem(data_module.IDX_MD5, name,
                            {f: hashlib.md5(payload).hexdigest() for f, payload in raw.items()})
    spec = data_module.IDX_SPECS["fashion-mnist"]
    monkeypatch.setitem(data_module.IDX_SPECS, "fashion-mnist",
                        dataclasses.replace(spec, system="/nonexistent/fashion-mnist"))
    return use


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("compress", [None, "release", "debian"])
def test_idx_files_read_back_exactly(tmp_path, idx_md5, name, compress):
    raw, arrays = _idx_release(seed=3)
    _write_idx(tmp_path / name, raw, compress)
    idx_md5(name, raw)  # verify_md5 stays on: the decompressed bytes are what is checked
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path), download=False,
                                 normalize=False))
    assert ds.num_classes == 10
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert float(ds.x_train[4, 0, 27, 3]) == pytest.approx(arrays[TRAIN_X][4, 27, 3] / 255)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), arrays[TRAIN_X] / 255, atol=1e-7)
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), arrays[TEST_X] / 255, atol=1e-7)
    assert ds.y_train.tolist() == arrays[TRAIN_Y].tolist()
    assert ds.y_test.tolist() == arrays[TEST_Y].tolist()


def test_debian_style_gz_differs_in_bytes_not_content():
    raw, _ = _idx_release(seed=3)
    payload = raw[TRAIN_X]
    release, debian = gzip.compress(payload, 9, mtime=0), gzip.compress(payload, 1, mtime=1)
    assert release != debian and gzip.decompress(debian) == payload


def test_idx_folders_keep_mnist_and_fashion_apart_and_root_itself_works(tmp_path, idx_md5):
    digits, digit_arrays = _idx_release(seed=1)
    fashion, fashion_arrays = _idx_release(seed=2)
    _write_idx(tmp_path / "mnist", digits, "release")
    _write_idx(tmp_path / "fashion-mnist", fashion)
    idx_md5("mnist", digits)
    idx_md5("fashion-mnist", fashion)
    for name, arrays in (("mnist", digit_arrays), ("fashion-mnist", fashion_arrays)):
        ds = load_dataset(DataConfig(name=name, root=str(tmp_path), download=False))
        assert ds.y_train.tolist() == arrays[TRAIN_Y].tolist()
    # data.root may also point at the folder that holds the four files.
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path / "mnist"), download=False))
    assert ds.y_test.tolist() == digit_arrays[TEST_Y].tolist()


def test_idx_subset_keeps_working(tmp_path, idx_md5):
    raw, _ = _idx_release(seed=4)
    _write_idx(tmp_path / "fashion-mnist", raw, "debian")
    idx_md5("fashion-mnist", raw)
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False,
                                 subset=10))
    assert ds.x_train.shape == (10, 1, 28, 28) and sorted(ds.y_train.tolist()) == list(range(10))


def _broken(raw, name, payload):
    return {**raw, name: payload}


@pytest.mark.parametrize("make, match", [
    (lambda raw: _broken(raw, TRAIN_X, struct.pack(">I", 0x801) + raw[TRAIN_X][4:]),
     "train-images-idx3-ubyte: bad magic number 0x00000801, expected 0x00000803"),
    (lambda raw: _broken(raw, TEST_Y, struct.pack(">I", 0x803) + raw[TEST_Y][4:]),
     "t10k-labels-idx1-ubyte: bad magic number 0x00000803, expected 0x00000801"),
    (lambda raw: _broken(raw, TRAIN_X, raw[TRAIN_X][:-100]),
     r"train-images-idx3-ubyte: truncated, the header declares 20 x 28 x 28 images "
     r"\(15696 bytes\) but the file has 15596"),
    (lambda raw: _broken(raw, TRAIN_X, struct.pack(">IIII", 0x803, *[2**32 - 1] * 3)),
     "train-images-idx3-ubyte: truncated, the header declares 4294967295 x 4294967295 x "
     "4294967295 images"),
    (lambda raw: _broken(raw, TRAIN_Y, raw[TRAIN_Y][:5]),
     "train-labels-idx1-ubyte: truncated, 5 bytes is shorter than the 8-byte IDX header"),
    (lambda raw: _broken(raw, TEST_X, raw[TEST_X] + b"\0\0\0"),
     "t10k-images-idx3-ubyte: 3 bytes after the 10 x 28 x 28 images"),
    (lambda raw: _broken(raw, TRAIN_Y, _idx_labels(np.arange(19) % 10)),
     r"train-images-idx3-ubyte holds 20 images but .*train-labels-idx1-ubyte holds 19 labels"),
    (lambda raw: _broken(raw, TEST_Y, _idx_labels([3, 1, 4, 1, 5, 9, 2, 6, 10, 3])),
     "t10k-labels-idx1-ubyte: label 10 at index 8 is outside 0..9"),
    (lambda raw: _broken(raw, TRAIN_Y, gzip.compress(raw[TRAIN_Y])),
     "train-labels-idx1-ubyte: bad magic number 0x1f8b.*gzip-compressed, so name it"),
])
def test_broken_idx_files_are_refused_naming_file_and_problem(tmp_path, idx_md5, make, match):
    raw, _ = _idx_release(seed=5)
    _write_idx(tmp_path / "mnist", make(raw))
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False,
                                verify_md5=False))


def test_a_broken_gzip_is_refused(tmp_path, idx_md5):
    raw, _ = _idx_release(seed=5)
    _write_idx(tmp_path / "mnist", raw, "release")
    path = tmp_path / "mnist" / f"{TEST_X}.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: not a readable gzip"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False,
                                verify_md5=False))


def test_idx_md5_refuses_a_tampered_file_unless_told_not_to(tmp_path, idx_md5):
    raw, arrays = _idx_release(seed=6)
    idx_md5("fashion-mnist", raw)
    tampered = bytearray(raw[TRAIN_X])
    tampered[16 + 2 * 784 + 5 * 28 + 7] ^= 0xFF  # image 2, row 5, column 7
    _write_idx(tmp_path / "fashion-mnist", {**raw, TRAIN_X: bytes(tampered)}, "debian")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: decompressed content "
                       r"has md5 [0-9a-f]{32}, not the official .*data.verify_md5=false"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False))
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False,
                                 verify_md5=False, normalize=False))
    assert float(ds.x_train[2, 0, 5, 7]) == pytest.approx((arrays[TRAIN_X][2, 5, 7] ^ 0xFF) / 255)


def test_missing_idx_files_say_where_to_put_them(tmp_path, idx_md5):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False))
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "fashion-mnist") in text
    assert "train-images-idx3-ubyte.gz" in text and "apt-get install dataset-fashion-mnist" in text
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert str(tmp_path / "mnist") in str(info.value) and "apt-get" not in str(info.value)


def test_idx_download_is_md5_checked_on_the_content(tmp_path, monkeypatch, idx_md5):
    raw, arrays = _idx_release(seed=7)
    mirror = tmp_path / "mirror"
    _write_idx(mirror, raw, "debian")
    spec = data_module.IDX_SPECS["mnist"]
    dead = (tmp_path / "dead").as_uri() + "/"  # the first mirror fails, the second answers
    monkeypatch.setitem(data_module.IDX_SPECS, "mnist",
                        dataclasses.replace(spec, mirrors=(dead, mirror.as_uri() + "/")))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="expected 6bbc9ace898e44ae57da46a324031adb"):
        load_dataset(DataConfig(name="mnist", root=str(root)))  # the real MNIST MD5s
    assert not list(root.rglob("*.gz*"))  # a bad download leaves nothing behind
    idx_md5("mnist", raw)
    ds = load_dataset(DataConfig(name="mnist", root=str(root), normalize=False))
    assert ds.y_test.tolist() == arrays[TEST_Y].tolist()
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(f"{n}.gz" for n in raw)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_reads_the_real_fashion_mnist_from_debian(tmp_path):
    # The published MD5s of the decompressed release files, checked independently here.
    published = {TRAIN_X: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                 TRAIN_Y: "9018921c3c673c538a1fc5bad174d6f9",
                 TEST_X: "8181f5470baa50b63fa0f6fddb340f0a",
                 TEST_Y: "15d484375f8d13e6eb1aabb0c3f46965"}
    for name, md5 in published.items():
        content = gzip.decompress((DEBIAN_FASHION / f"{name}.gz").read_bytes())
        assert hashlib.md5(content).hexdigest() == md5
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False,
                                 normalize=False))  # verify_md5 is on by default
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.bincount(ds.y_train.numpy()).tolist() == [6000] * 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0


# -- your own data: .npz -------------------------------------------------------------------

def _npz_arrays(layout, dtype, seed=0):
    """x_train (12 images), x_test (6) of 3 x 5 x 6 (C x H x W) pixels in `layout`."""
    rng = np.random.default_rng(seed)
    channels = 1 if layout == "nhw" else 3
    shape = {"nhw": (5, 6), "nhwc": (5, 6, channels), "nchw": (channels, 5, 6)}[layout]
    def images(n):
        if dtype == "uint8":
            return rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        return rng.normal(size=(n, *shape)).astype(np.float32)
    return {"x_train": images(12), "y_train": np.arange(12) % 3,
            "x_test": images(6), "y_test": np.array([2, 0, 1, 1, 0, 2])}


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts_read_back_exactly(tmp_path, layout, dtype):
    arrays = _npz_arrays(layout, dtype)
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    ds = load_dataset(DataConfig(name="npz", path=str(path), normalize=False))
    channels = 1 if layout == "nhw" else 3
    assert ds.x_train.shape == (12, channels, 5, 6) and ds.x_test.shape == (6, channels, 5, 6)
    assert ds.num_classes == 3
    assert ds.y_train.tolist() == [0, 1, 2] * 4 and ds.y_test.tolist() == [2, 0, 1, 1, 0, 2]
    scale = 255 if dtype == "uint8" else 1
    for split, x in (("x_train", ds.x_train), ("x_test", ds.x_test)):
        written = arrays[split]
        for i, c, h, w in ((0, 0, 0, 0), (3, channels - 1, 4, 5), (5, channels // 2, 2, 1)):
            index = {"nhw": (i, h, w), "nhwc": (i, h, w, c), "nchw": (i, c, h, w)}[layout]
            pixel = written[index]
            assert float(x[i, c, h, w]) == pytest.approx(float(pixel) / scale, abs=1e-7)


@pytest.mark.parametrize("shape, chw, channels_last", [
    ((2, 28, 28, 1), (1, 28, 28), True),
    ((2, 1, 28, 28), (1, 28, 28), False),
    ((2, 32, 4, 3), (3, 32, 4), True),  # last size is a channel count, second is not
    ((2, 3, 32, 4), (3, 32, 4), False),  # both could be: channels-first
    ((2, 5, 6, 7), (5, 6, 7), False),  # neither: channels-first
])
def test_npz_channel_layout_rule(tmp_path, shape, chw, channels_last):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.savez(tmp_path / "r.npz", x_train=x, y_train=np.array([0, 1]), x_test=x,
             y_test=np.array([1, 0]))
    ds = load_dataset(DataConfig(name="npz", path=str(tmp_path / "r.npz"), normalize=False))
    assert ds.input_shape == chw
    expected = x.transpose(0, 3, 1, 2) if channels_last else x
    assert np.array_equal(ds.x_test.numpy(), expected)


def test_npz_accepts_keras_column_labels_and_counts_classes_from_the_largest(tmp_path):
    arrays = _npz_arrays("nhwc", "uint8")
    arrays["y_train"] = (np.arange(12) % 5)[:, None]  # Keras' CIFAR labels are (N, 1)
    arrays["y_test"] = np.array([[4], [0], [1], [2], [3], [0]])
    np.savez(tmp_path / "k.npz", **arrays)
    ds = load_dataset(DataConfig(name="npz", path=str(tmp_path / "k.npz"), subset=5))
    assert ds.num_classes == 5 and ds.y_test.tolist() == [4, 0, 1, 2, 3, 0]
    assert sorted(ds.y_train.tolist()) == [0, 1, 2, 3, 4]


def _with(**changes):
    def make(arrays):
        arrays = {**arrays, **changes}
        return {k: v for k, v in arrays.items() if v is not None}
    return make


@pytest.mark.parametrize("make, match", [
    (_with(x_test=None, y_test=None), r"lacks x_test, y_test \(it holds x_train, y_train\)"),
    (_with(x_train=np.zeros((12, 30))), r"x_train has shape \(12, 30\); expected N x H x W"),
    (_with(y_train=np.arange(11) % 3), "x_train holds 12 images but .*y_train holds 11 labels"),
    (_with(x_test=np.zeros((6, 3, 4, 6), np.uint8)),
     "x_train images are 3x5x6 .* but x_test images 3x4x6"),
    (_with(y_train=np.zeros(12, int), y_test=np.zeros(6, int)), "one class only"),
    (_with(y_test=np.array([2, 0, -1, 1, 0, 2])), "y_test holds the negative label -1"),
    (_with(y_train=(np.arange(12) % 3).astype(float)), "y_train has dtype float64; labels "
     "must be integers"),
    (_with(y_test=np.array([2, 0, 1, 5, 0, 2])), "y_test holds label 5 but y_train's labels "
     "stop at 2"),
    (_with(y_train=np.arange(12) % 3 + 1, y_test=np.array([3, 1, 2, 2, 1, 3])),
     "no training image has label 0.*one-based"),
    (_with(x_train=np.where(np.arange(12)[:, None, None, None] == 7, np.nan,
                            np.ones((12, 3, 5, 6), np.float32))),
     r"x_train holds NaN or infinite pixels \(first in image 7\)"),
    (_with(x_test=np.ones((6, 3, 5, 6), np.int64)), "x_test has dtype int64; give uint8"),
    (_with(y_train=np.eye(3)[np.arange(12) % 3].astype(int)), "for one-hot rows"),
])
def test_malformed_npz_is_refused(tmp_path, make, match):
    np.savez(tmp_path / "bad.npz", **make(_npz_arrays("nchw", "uint8")))
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))


def test_npz_object_arrays_and_non_archives_are_refused(tmp_path):
    arrays = _npz_arrays("nhw", "uint8")
    arrays["y_test"] = np.array([2, 0, "cat", 1, 0, 2], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)  # savez pickles object arrays
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil()
    evil[0].marker = marker
    np.savez(tmp_path / "evil.npz", **{**arrays, "y_test": evil})
    for name in ("pickled.npz", "evil.npz"):
        with pytest.raises(DataError, match="'y_test' is an object array.*pickled data is "
                           "refused"):
            load_dataset(DataConfig(name="npz", path=str(tmp_path / name)))
    assert not marker.exists()
    np.save(tmp_path / "one.npy", arrays["x_train"])
    with pytest.raises(DataError, match="holds a single array"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "one.npy")))
    (tmp_path / "notes.npz").write_text("not numpy")
    with pytest.raises(DataError, match="notes.npz: not a readable .npz"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "notes.npz")))
    with pytest.raises(DataError, match="no such file"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "missing.npz")))


def test_data_path_is_required_for_npz_and_folder_and_only_there():
    with pytest.raises(ValidationError, match="data.name=npz needs data.path"):
        DataConfig(name="npz")
    with pytest.raises(ConfigError, match="data.name=folder needs data.path"):
        load_config("digits", ["data.name=folder"])
    with pytest.raises(ConfigError, match="data.path is read only by data.name=npz or folder"):
        load_config("digits", ["data.path=x.npz"])
    with pytest.raises(ConfigError, match="unknown key 'data.paht'"):
        load_config("digits", ["data.name=npz", "data.path=x.npz", "data.paht=y"])
    assert load_config("digits", ["data.name=npz", "data.path=x.npz"]).data.path == "x.npz"


# -- your own data: an image-folder tree ---------------------------------------------------

def _png(path, pixels):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image_tree(root, classes=("cat", "dog", "emu"), per_class=4, size=(4, 5), seed=0):
    """Grayscale PNGs of `size` (H, W); returns {pixel bytes: class index}."""
    rng = np.random.default_rng(seed)
    written = {}
    for label, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            _png(root / name / f"{i:02d}.png", pixels)
            written[pixels.tobytes()] = label
    return written


def _as_uint8(x):
    return np.rint(x.numpy() * 255).astype(np.uint8)


def test_image_folder_reads_back_exactly_with_a_fixed_stratified_split(tmp_path):
    written = _image_tree(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / ".DS_Store").write_bytes(b"\0\1junk")  # hidden: skipped
    cfg = DataConfig(name="folder", path=str(tmp_path / "imgs"), test_size=0.25,
                     normalize=False)
    ds = load_dataset(cfg)
    assert ds.num_classes == 3
    assert ds.x_train.shape == (9, 1, 4, 5) and ds.x_test.shape == (3, 1, 4, 5)
    assert sorted(ds.y_test.tolist()) == [0, 1, 2]
    seen = []
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for image, label in zip(_as_uint8(x[:, 0]), y.tolist(), strict=True):
            assert written[image.tobytes()] == label
            seen.append(image.tobytes())
    assert sorted(seen) == sorted(written)
    assert load_dataset(cfg).y_test.tolist() == ds.y_test.tolist()


def test_image_folder_with_colour_repeats_grayscale_to_three_channels(tmp_path):
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    for i in range(3):
        _png(tmp_path / "b_rgb" / f"{i}.png", colour[i])
        _png(tmp_path / "a_gray" / f"{i}.png", gray[i])
    ds = load_dataset(DataConfig(name="folder", path=str(tmp_path), test_size=0.34,
                                 normalize=False))
    assert ds.input_shape == (3, 4, 5)
    images = np.concatenate([_as_uint8(ds.x_train), _as_uint8(ds.x_test)])
    labels = ds.y_train.tolist() + ds.y_test.tolist()
    got = {img.transpose(1, 2, 0).tobytes(): lab for img, lab in zip(images, labels, strict=True)}
    for i in range(3):
        assert got[colour[i].tobytes()] == 1
        assert got[np.repeat(gray[i][:, :, None], 3, axis=2).tobytes()] == 0


def test_malformed_image_folders_are_refused(tmp_path):
    def load(root):
        return load_dataset(DataConfig(name="folder", path=str(root)))

    _image_tree(tmp_path / "sizes", classes=("a", "b"))
    _png(tmp_path / "sizes" / "b" / "zz.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(DataError, match=r"images differ in size: .*a/00.png is 5x4 but "
                       r".*b/zz.png is 5x6"):
        load(tmp_path / "sizes")
    _image_tree(tmp_path / "text", classes=("a", "b"))
    (tmp_path / "text" / "b" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"b/notes.txt is not an image Pillow can read"):
        load(tmp_path / "text")
    _image_tree(tmp_path / "single", classes=("only",))
    with pytest.raises(DataError, match=r"has 1 class folder\(s\) \(only\)"):
        load(tmp_path / "single")
    _image_tree(tmp_path / "empty", classes=("a", "b"))
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty/c holds no images"):
        load(tmp_path / "empty")
    _image_tree(tmp_path / "lonely", classes=("a", "b"))
    _png(tmp_path / "lonely" / "c" / "x.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match=r"lonely/c holds one image; the stratified test split"):
        load(tmp_path / "lonely")
    with pytest.raises(DataError, match="is not a folder"):
        load(tmp_path / "nowhere")
