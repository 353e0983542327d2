"""Data sets as tensors: digits (embedded), CIFAR-10/100 (official archives), synthetic.

Every loader returns a :class:`Dataset` of image tensors (N, C, H, W) and integer
labels (N,), split into train and test, optionally reduced to a deterministic
stratified subset and standardized per channel with training statistics. Small data
sets live whole on the training device, so the training loop does no host work.

CIFAR batches are Python pickles. They are read with an unpickler that admits only
what the official files contain (a dict of bytes, lists and uint8 NumPy arrays): any
other global a crafted pickle names is refused before anything runs.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from escapelab.config import DataConfig
from escapelab.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Train and test images (N, C, H, W) with labels (N,) int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per-channel statistics used to standardize (0/1 if off)
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Dataset:
        return replace(self, x_train=self.x_train.to(device, dtype),
                       x_test=self.x_test.to(device, dtype),
                       y_train=self.y_train.to(device), y_test=self.y_test.to(device))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic class-stratified subset of `size` samples."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if size >= n:
        return np.arange(n)
    idx, _ = train_test_split(np.arange(n), train_size=size, stratify=labels,
                              random_state=seed)
    return np.sort(idx)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split, subset and standardize the data set named by ``cfg.name`` (on CPU)."""
    if cfg.name == "digits":
        raw = _digits(cfg)
    elif cfg.name == "synthetic":
        raw = _synthetic(cfg)
    else:
        raw = _cifar(cfg)
    x_tr, y_tr, x_te, y_te, n_classes = raw
    if cfg.subset is not None:
        if cfg.subset > len(y_tr):
            raise DataError(f"data.subset={cfg.subset} exceeds the {len(y_tr)} training "
                            f"images of {cfg.name}")
        keep = stratified_subset(y_tr, cfg.subset, cfg.split_seed)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    channels = x_tr.shape[1]
    if cfg.normalize:
        mean = x_tr.mean(axis=(0, 2, 3), dtype=np.float64)
        std = x_tr.std(axis=(0, 2, 3), dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(channels), np.ones(channels)

    def standardize(x: np.ndarray) -> Tensor:
        z = (x - mean[None, :, None, None]) / std[None, :, None, None]
        return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))

    return Dataset(
        name=cfg.name,
        x_train=standardize(x_tr),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=standardize(x_te),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        num_classes=n_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _digits(cfg: DataConfig) -> Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_size, stratify=y,
                                              random_state=cfg.split_seed)
    return x_tr, y_tr, x_te, y_te, 10


def _synthetic(cfg: DataConfig) -> Raw:
    """Class prototypes ~ N(0, 1) per pixel plus N(0, noise^2) per sample."""
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.split_seed)
    prototypes = rng.standard_normal((s.n_classes, s.channels, s.size, s.size))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % s.n_classes
        rng.shuffle(y)
        x = prototypes[y] + s.noise * rng.standard_normal((n, s.channels, s.size, s.size))
        return x.astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = sample(s.n_train)
    x_te, y_te = sample(s.n_test)
    return x_tr, y_tr, x_te, y_te, s.n_classes


# ---------------------------------------------------------------------------------------
# CIFAR from the official python-version archives

@dataclass(frozen=True)
class _CifarSpec:
    archive: str
    folder: str
    md5: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: str
    classes: int

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


CIFAR_SPECS = {
    "cifar10": _CifarSpec("cifar-10-python.tar.gz", "cifar-10-batches-py",
                          "c58f30108f718f92721af3b95e74349a",
                          tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                          "labels", 10),
    "cifar100": _CifarSpec("cifar-100-python.tar.gz", "cifar-100-python",
                           "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",),
                           "fine_labels", 100),
}


def data_root(cfg: DataConfig) -> Path:
    """Where CIFAR archives are looked for: data.root, else $ESCAPELAB_DATA, else ./data."""
    return Path(cfg.root or os.environ.get("ESCAPELAB_DATA") or "data").expanduser()


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode with unexpected arguments")
    return codecs.encode(text, "latin1")


class SafeCifarUnpickler(pickle.Unpickler):
    """Unpickler admitting only the globals that official CIFAR batches use."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray",
                                                 "numpy._core.multiarray"):
            core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
            return core.multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


def read_cifar_batch(payload: bytes, source: str, spec: _CifarSpec) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Images (N, 3, 32, 32) float32 in [0, 1] and labels (N,) of one pickled batch."""
    try:
        obj = SafeCifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:  # any failure to parse is a bad file, never a crash
        raise DataError(f"{source} is not an official CIFAR batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} is not an official CIFAR batch: top level is "
                        f"{type(obj).__name__}, not a dict")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = entries.get("data"), entries.get(spec.label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise DataError(f"{source}: 'data' must be a uint8 array of shape (N, 3072)")
    labels_arr = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
    if (labels_arr is None or labels_arr.shape != (data.shape[0],)
            or not np.issubdtype(labels_arr.dtype, np.integer)
            or (labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= spec.classes))):
        raise DataError(f"{source}: '{spec.label_key}' must be {data.shape[0]} integer labels "
                        f"in 0..{spec.classes - 1}")
    images = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels_arr.astype(np.int64)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _locate_cifar(cfg: DataConfig, spec: _CifarSpec) -> Path:
    """The extracted folder or the archive, downloading the archive if allowed."""
    root = data_root(cfg)
    candidates = [root, root / spec.folder]
    for folder in candidates:
        if folder.is_dir() and all((folder / f).is_file() for f in spec.train + spec.test):
            return folder
    archive = root if root.is_file() else root / spec.archive
    if archive.is_file():
        return archive
    where = (f"Put {spec.archive} (from {spec.url}, md5 {spec.md5}) or its extracted "
             f"folder {spec.folder}/ into {root}, or point data.root / $ESCAPELAB_DATA at it")
    if not cfg.download:
        raise DataError(f"{cfg.name} not found in {root}. {where}.")
    root.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as response, part.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"{cfg.name} not found in {root} and the download from {spec.url} "
                        f"failed ({exc}). {where}.") from None
    got = _md5(part)
    if got != spec.md5:
        part.unlink(missing_ok=True)
        raise DataError(f"downloaded {spec.archive} has md5 {got}, expected {spec.md5}. {where}.")
    part.replace(archive)
    return archive


def _cifar(cfg: DataConfig) -> Raw:
    spec = CIFAR_SPECS[cfg.name]
    location = _locate_cifar(cfg, spec)
    payloads: dict[str, bytes] = {}
    if location.is_dir():
        for name in spec.train + spec.test:
            payloads[name] = (location / name).read_bytes()
    else:
        if cfg.verify_md5:
            got = _md5(location)
            if got != spec.md5:
                raise DataError(f"{location} has md5 {got}, not the official {spec.md5}; "
                                "replace it, or set data.verify_md5=false to read it anyway")
        try:
            with tarfile.open(location, "r:*") as tar:
                for name in spec.train + spec.test:
                    member = tar.extractfile(f"{spec.folder}/{name}")
                    if member is None:
                        raise KeyError(name)
                    payloads[name] = member.read()
        except (tarfile.TarError, KeyError, OSError) as exc:
            raise DataError(f"{location} is not a readable {spec.archive}: missing or broken "
                            f"member {exc}") from None

    def stack(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_batch(payloads[n], f"{location}:{n}", spec) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_tr, y_tr = stack(spec.train)
    x_te, y_te = stack(spec.test)
    return x_tr, y_tr, x_te, y_te, spec.classes
