"""Data sets as tensors: digits (embedded), CIFAR-10/100, MNIST, Fashion-MNIST, your own.

Every loader returns a :class:`Dataset` of image tensors (N, C, H, W) and integer
labels (N,), split into train and test, optionally reduced to a deterministic
stratified subset and standardized per channel with training statistics. Small data
sets live whole on the training device, so the training loop does no host work.

Where the files come from (``data.name``):

- ``cifar10`` / ``cifar100``: the official python-version archives, or their extracted
  folders, in the data root (``data.root``, else ``$ESCAPELAB_DATA``, else ``./data``).
- ``mnist`` / ``fashion-mnist``: the four official IDX files, gzipped or not, looked for in
  ``<root>/mnist/`` (``<root>/fashion-mnist/``), then in ``<root>`` itself, then (Fashion-
  MNIST only) in ``/usr/share/datasets/fashion-mnist/``, where Debian's
  ``dataset-fashion-mnist`` package puts them. The first folder holding all four wins.
  MD5s are checked on the decompressed bytes, so re-compressed copies such as Debian's pass.
- ``npz``: one ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (Keras' layout).
- ``folder``: ``data.path/<class>/<image>`` (torchvision's ImageFolder layout), with a fixed
  stratified test split like digits.

CIFAR batches are Python pickles. They are read with an unpickler that admits only
what the official files contain (a dict of bytes, lists and uint8 NumPy arrays): any
other global a crafted pickle names is refused before anything runs. ``.npz`` files are
read with pickles refused altogether.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import urllib.request
import zipfile
import zlib
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

    def channels_last(self) -> Dataset:
        """The same images in channels-last (NHWC) memory."""
        fmt = torch.channels_last
        return replace(self, x_train=self.x_train.contiguous(memory_format=fmt),
                       x_test=self.x_test.contiguous(memory_format=fmt))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic class-stratified subset of `size` samples.

    `seed` is any non-negative integer: scikit-learn takes seeds below 2^32 only, so a
    run's 63-bit stream seeds (the probe's, `config.stream_seed`) are first hashed to 32
    bits; seeds below 2^32 are used as they are (same subsets as before).
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if size >= n:
        return np.arange(n)
    if seed >= 2**32:
        seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    idx, _ = train_test_split(np.arange(n), train_size=size, stratify=labels,
                              random_state=seed)
    return np.sort(idx)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split, subset and standardize the data set named by ``cfg.name`` (on CPU)."""
    if cfg.name == "digits":
        raw = _digits(cfg)
    elif cfg.name == "synthetic":
        raw = _synthetic(cfg)
    elif cfg.name in IDX_SPECS:
        raw = _idx(cfg)
    elif cfg.name == "npz":
        raw = _npz(cfg)
    elif cfg.name == "folder":
        raw = _folder(cfg)
    else:
        raw = _cifar(cfg)
    x_tr, y_tr, x_te, y_te, n_classes = raw
    if cfg.subset is not None:
        if cfg.subset > len(y_tr):
            raise DataError(f"data.subset={cfg.subset} exceeds the {len(y_tr)} training "
                            f"images of {cfg.name}")
        keep = stratified_subset(y_tr, cfg.subset, cfg.split_seed)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if cfg.pad:  # zeros on every side, in pixel space (black for images in [0, 1])
        width = ((0, 0), (0, 0), (cfg.pad, cfg.pad), (cfg.pad, cfg.pad))
        x_tr, x_te = np.pad(x_tr, width), np.pad(x_te, width)
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

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    return (*_fixed_split(x, y, cfg, "digits"), 10)


def _fixed_split(x: np.ndarray, y: np.ndarray, cfg: DataConfig,
                 source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): the stratified data.test_size split, fixed by
    data.split_seed so that every run of a sweep sees the same test images."""
    from sklearn.model_selection import train_test_split

    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=cfg.test_size, stratify=y,
                                                  random_state=cfg.split_seed)
    except ValueError as exc:  # e.g. fewer test images than classes
        raise DataError(f"{source}: cannot make a stratified test split with "
                        f"data.test_size={cfg.test_size} ({exc})") from None
    return x_tr, y_tr, x_te, y_te


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
    """Where official data files are looked for: data.root, else $ESCAPELAB_DATA, else ./data."""
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


def _fetch(url: str, dest: Path) -> None:
    """Stream `url` into `dest`; on failure remove the partial file and re-raise."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response, dest.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError:
        dest.unlink(missing_ok=True)
        raise


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
        _fetch(spec.url, part)
    except OSError as exc:
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


# ---------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST from the official IDX files

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# MD5 of each file *after* decompression. The content, not the .gz, is checked because
# gzip output depends on the compressor's level and timestamp: Debian's
# dataset-fashion-mnist re-compressed the release, so its .gz MD5s differ from the
# published ones while the bytes inside are identical. Tests monkeypatch this table.
# Sources: MNIST, the extracted-file MD5s in prabhuomkar/pytorch-cpp,
# cmake/fetch_mnist.cmake (MNIST_EXTRACTED_FILE_MD5S; several other projects that verify
# extracted files list the same four). Fashion-MNIST, the raw-file MD5s listed by public
# projects that verify extracted files (e.g. torchvision-based FashionMNIST wrappers'
# `raw_data`, tutorials' `md5sum` of the gunzipped release), confirmed here against
# `zcat /usr/share/datasets/fashion-mnist/*.gz | md5sum` of Debian's package.
IDX_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


@dataclass(frozen=True)
class _IdxSpec:
    folder: str  # sub-folder of the data root, and where downloads go
    mirrors: tuple[str, ...]  # base URLs serving <file>.gz, tried in order
    system: str | None = None  # a distribution package's read-only folder
    package: str | None = None  # the Debian package that fills it

    def folders(self, root: Path) -> list[Path]:
        """Where the four files are looked for, in order."""
        found = [root / self.folder, root]
        return found + [Path(self.system)] if self.system else found


IDX_SPECS = {
    # LeCun's site first (the official home); it has at times refused downloads, so
    # torchvision's copy of the same files follows.
    "mnist": _IdxSpec("mnist", ("http://yann.lecun.com/exdb/mnist/",
                                "https://ossci-datasets.s3.amazonaws.com/mnist/")),
    "fashion-mnist": _IdxSpec(
        "fashion-mnist", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system="/usr/share/datasets/fashion-mnist", package="dataset-fashion-mnist"),
}


def read_idx(raw: bytes, source: str, ndim: int) -> np.ndarray:
    """The uint8 array of shape given by its header, from the bytes of an IDX file.

    Layout (big-endian): magic 0x0000080D (0x08 = unsigned byte, D = ndim), then D sizes
    as uint32, then the data row-major: 16 header bytes for images (D = 3), 8 for labels.
    """
    header = 4 + 4 * ndim
    kind = "images" if ndim == 3 else "labels"
    if len(raw) < header:
        raise DataError(f"{source}: truncated, {len(raw)} bytes is shorter than the "
                        f"{header}-byte IDX header of {kind}")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x800 + ndim:
        hint = ("; it looks gzip-compressed, so name it *.gz" if raw[:2] == b"\x1f\x8b"
                else "; is it the right file?")
        raise DataError(f"{source}: bad magic number 0x{magic:08x}, expected "
                        f"0x{0x800 + ndim:08x} (IDX uint8 {kind}){hint}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)  # exact: a crafted header cannot overflow it
    dims = " x ".join(str(d) for d in shape)
    if min(shape) == 0:
        raise DataError(f"{source}: the header declares {dims} {kind}, i.e. none")
    if len(raw) < expected:
        raise DataError(f"{source}: truncated, the header declares {dims} {kind} "
                        f"({expected} bytes) but the file has {len(raw)}")
    if len(raw) > expected:
        raise DataError(f"{source}: {len(raw) - expected} bytes after the {dims} {kind} "
                        "its header declares")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 0..255 as a C-contiguous float32 copy in [0, 1], scaled in place (one copy)."""
    out = np.ascontiguousarray(pixels, dtype=np.float32)
    out /= 255
    return out


def _idx_file(folder: Path, name: str) -> Path | None:
    """`name` or `name.gz` in `folder` (the uncompressed one first), if either exists."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _gunzip(data: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{source}: not a readable gzip file ({exc})") from None


def _idx_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it ends in .gz."""
    data = path.read_bytes()
    return _gunzip(data, str(path)) if path.suffix == ".gz" else data


def _locate_idx(cfg: DataConfig, spec: _IdxSpec) -> dict[str, Path]:
    """The four files, from the first folder holding all of them, downloading if allowed."""
    root = data_root(cfg)
    for folder in spec.folders(root):
        found = {name: _idx_file(folder, name) for name in IDX_FILES}
        if all(found.values()):
            return {name: path for name, path in found.items() if path is not None}
    target = root / spec.folder
    where = (f"Put {', '.join(f + '.gz' for f in IDX_FILES)} (gzipped or not, from "
             f"{spec.mirrors[0]}) into {target}/, or point data.root / $ESCAPELAB_DATA at "
             "their folder")
    if spec.package:
        where += f"; or `apt-get install {spec.package}`, which puts them in {spec.system}/"
    places = ", ".join(str(f) for f in spec.folders(root))
    if not cfg.download:
        raise DataError(f"{cfg.name} not found in {places}. {where}.")
    target.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in IDX_FILES:
        paths[name] = _idx_file(target, name) or _download_idx(cfg, spec, target, name, where)
    return paths


def _download_idx(cfg: DataConfig, spec: _IdxSpec, target: Path, name: str,
                  where: str) -> Path:
    """target/<name>.gz from the first mirror whose file decompresses to the official MD5,
    checked whatever data.verify_md5 says (a download is never trusted)."""
    path = target / f"{name}.gz"
    part = path.with_name(path.name + ".part")
    expected = IDX_MD5[cfg.name][name]
    failures = []
    for base in spec.mirrors:
        url = base + path.name
        try:
            _fetch(url, part)
            got = hashlib.md5(_gunzip(part.read_bytes(), url)).hexdigest()
        except (OSError, DataError) as exc:
            part.unlink(missing_ok=True)
            failures.append(f"{url}: {exc}")
            continue
        if got == expected:
            part.replace(path)
            return path
        part.unlink()
        failures.append(f"{url} decompresses to md5 {got}, expected {expected}")
    raise DataError(f"{cfg.name} not found in {target} and the download failed "
                    f"({'; '.join(failures)}). {where}.")


def _read_idx_file(path: Path, name: str, cfg: DataConfig) -> np.ndarray:
    """Images (N, H, W) or labels (N,) uint8 of one file, header- and MD5-checked."""
    raw = _idx_bytes(path)
    array = read_idx(raw, str(path), ndim=3 if "images" in name else 1)
    if cfg.verify_md5:
        got, expected = hashlib.md5(raw).hexdigest(), IDX_MD5[cfg.name][name]
        if got != expected:
            raise DataError(f"{path}: decompressed content has md5 {got}, not the official "
                            f"{expected} of {name}; replace it, or set data.verify_md5=false "
                            "to read it anyway")
    return array


def _idx_split(paths: dict[str, Path], split: str,
               cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) float32 in [0, 1] and labels (N,) of split 'train' or 't10k'."""
    image_name, label_name = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
    image_path, label_path = paths[image_name], paths[label_name]
    images = _read_idx_file(image_path, image_name, cfg)
    labels = _read_idx_file(label_path, label_name, cfg)
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds "
                        f"{len(labels)} labels")
    if labels.max() > 9:
        at = int(np.argmax(labels > 9))
        raise DataError(f"{label_path}: label {labels[at]} at index {at} is outside 0..9")
    return _unit_float(images[:, None]), labels.astype(np.int64)


def _idx(cfg: DataConfig) -> Raw:
    paths = _locate_idx(cfg, IDX_SPECS[cfg.name])
    x_tr, y_tr = _idx_split(paths, "train", cfg)
    x_te, y_te = _idx_split(paths, "t10k", cfg)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{cfg.name}: training images are {x_tr.shape[2]}x{x_tr.shape[3]} "
                        f"but test images {x_te.shape[2]}x{x_te.shape[3]}")
    return x_tr, y_tr, x_te, y_te, 10


# ---------------------------------------------------------------------------------------
# Your own data: an .npz archive in Keras' layout

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of the archive, with pickled (object) arrays refused."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    if isinstance(archive, np.ndarray):
        raise DataError(f"{path} holds a single array; save x_train, y_train, x_test, "
                        "y_test together with np.savez")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (it holds "
                            f"{', '.join(archive.files) or 'nothing'}); save x_train, "
                            "y_train, x_test, y_test (Keras' names)")
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # object arrays need pickle, which is refused
                problem = ("is an object array, and pickled data is refused; save plain "
                           "numeric arrays" if "allow_pickle" in str(exc) else str(exc))
                raise DataError(f"{path}: '{key}' {problem}") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{path}: cannot read '{key}' ({exc})") from None
    return arrays


def _npz_images(x: np.ndarray, source: str) -> np.ndarray:
    """(N, C, H, W) float32 from N x H x W, N x H x W x C or N x C x H x W.

    A 4-d array is channels-last when its last size is 1, 3 or 4 and its second is not;
    otherwise channels-first. uint8 is scaled by 1/255; floats are kept as they are.
    """
    if x.ndim not in (3, 4) or x.shape[0] == 0:
        raise DataError(f"{source} has shape {x.shape}; expected N x H x W, N x H x W x C "
                        "or N x C x H x W with N >= 1")
    if x.dtype == np.uint8:
        scaled = _unit_float(x)
    elif np.issubdtype(x.dtype, np.floating):
        scaled = x.astype(np.float32)
        if not np.isfinite(scaled).all():
            first = int(np.argmin(np.isfinite(scaled).reshape(len(x), -1).all(axis=1)))
            raise DataError(f"{source} holds NaN or infinite pixels (first in image {first})")
    else:
        raise DataError(f"{source} has dtype {x.dtype}; give uint8 (0..255, scaled by "
                        "1/255) or floating point (kept as is)")
    if scaled.ndim == 3:
        return scaled[:, None]
    channels_last = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)) if channels_last else scaled


def _npz_labels(y: np.ndarray, source: str, n_images: int, images: str) -> np.ndarray:
    """(N,) int64 labels from (N,) or Keras' (N, 1), each a non-negative integer."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source} has shape {y.shape}; expected ({n_images},) integer "
                        "labels (for one-hot rows, save their argmax)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source} has dtype {y.dtype}; labels must be integers 0..K-1")
    if len(y) != n_images:
        raise DataError(f"{images} holds {n_images} images but {source} holds {len(y)} "
                        "labels")
    if y.min() < 0:
        raise DataError(f"{source} holds the negative label {y.min()}; labels must be "
                        "integers 0..K-1")
    return y.astype(np.int64)


def _npz(cfg: DataConfig) -> Raw:
    """Classes are 0..K-1 with K = 1 + the largest label; each must have a training image
    (so a one-based 1..K labelling, or a test label no training image has, is refused)."""
    path = Path(str(cfg.path)).expanduser()
    if not path.is_file():
        raise DataError(f"data.path={cfg.path}: no such file; give an .npz with x_train, "
                        "y_train, x_test, y_test")
    arrays = _npz_arrays(path)
    x_tr = _npz_images(arrays["x_train"], f"{path}: x_train")
    x_te = _npz_images(arrays["x_test"], f"{path}: x_test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{path}: x_train images are {'x'.join(map(str, x_tr.shape[1:]))} "
                        f"(C x H x W) but x_test images {'x'.join(map(str, x_te.shape[1:]))}")
    y_tr = _npz_labels(arrays["y_train"], f"{path}: y_train", len(x_tr), "x_train")
    y_te = _npz_labels(arrays["y_test"], f"{path}: y_test", len(x_te), "x_test")
    if y_te.max() > y_tr.max():
        raise DataError(f"{path}: y_test holds label {y_te.max()} but y_train's labels stop "
                        f"at {y_tr.max()}; every class needs training images")
    present = np.unique(y_tr)
    if len(present) < 2:
        raise DataError(f"{path}: y_train holds one class only (label {present[0]}); a "
                        "classifier needs at least two")
    if len(present) != present[-1] + 1:
        gap = int(np.argmax(present != np.arange(len(present))))
        raise DataError(f"{path}: no training image has label {gap}, but labels go up to "
                        f"{present[-1]}; labels must be 0..K-1 with every class in y_train "
                        "(one-based labels? subtract 1)")
    return x_tr, y_tr, x_te, y_te, int(present[-1]) + 1


# ---------------------------------------------------------------------------------------
# Your own data: an image-folder tree, data.path/<class>/<image>

def _read_image(path: Path) -> np.ndarray:
    """(H, W) uint8 for 1-bit and grayscale images, else (H, W, 3) RGB (alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                raise DataError(f"{path} is a 16-bit or float image (mode {image.mode}); "
                                "save 8-bit grayscale or RGB")
            return np.asarray(image.convert("L" if image.mode in ("1", "L", "LA") else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} is not an image Pillow can read ({exc}); class folders "
                        "may hold only images (hidden files are skipped)") from None


def _class_files(folder: Path) -> list[Path]:
    """Files under a class folder, recursively and sorted, hidden ones (.*) skipped."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _folder(cfg: DataConfig) -> Raw:
    """Classes are the sorted sub-folder names (label i = i-th name). Images must share
    one size; if any is in colour, grayscale ones are repeated to 3 channels."""
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path} is not a folder; give one with a sub-folder "
                        "of images per class (data.path/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s) ({', '.join(classes)}); "
                        "give one sub-folder of images per class, at least two classes")
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: Path | None = None
    for label, name in enumerate(classes):
        files = _class_files(root / name)
        if not files:
            raise DataError(f"class folder {root / name} holds no images")
        if len(files) < 2:
            raise DataError(f"class folder {root / name} holds one image; the stratified "
                            "test split (data.test_size) needs at least two per class")
        for path in files:
            pixels = _read_image(path)
            if first is None:
                first = path
            elif pixels.shape[:2] != images[0].shape[:2]:
                (h0, w0), (h1, w1) = images[0].shape[:2], pixels.shape[:2]
                raise DataError(f"images differ in size: {first} is {w0}x{h0} but {path} is "
                                f"{w1}x{h1} (width x height); resize them to one size")
            images.append(pixels)
            labels.append(label)
    colour = any(p.ndim == 3 for p in images)
    x = np.stack([p if p.ndim == 3 else np.repeat(p[:, :, None], 3 if colour else 1, axis=2)
                  for p in images])  # (N, H, W, C) uint8
    x = _unit_float(x.transpose(0, 3, 1, 2))
    y = np.asarray(labels, dtype=np.int64)
    return (*_fixed_split(x, y, cfg, str(root)), len(classes))
