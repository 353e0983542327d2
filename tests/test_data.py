from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from escapelab.config import DataConfig, SyntheticConfig
from escapelab.data import load_dataset, stratified_subset
from escapelab.errors import DataError


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
