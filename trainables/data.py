"""Datasets as uint8 arrays, the seeded train/validation split, and a tensor-resident batch loader.

Sources (`--data-dir DIR` or the DYNASTUDY_DATA variable):
  cifar10 / cifar100  the python-pickle layout torchvision downloads (`cifar-10-batches-py/`,
                      `cifar-100-python/`, read directly, no md5 check), or the image-folder form
                      `cifar10/{train,test}/<class>/<image>` as a folder or as the archive `cifar10-jpeg.tar.gz`;
                      when none is there, torchvision downloads the pickles into DIR (unless offline).
  imagefolder         any `{train,test}/<class>/<image>` tree in DIR (images resized to data.image_size).
  synthetic           seeded random 32x32 images with class structure, for tests and smoke runs.
Decoded images are cached once as uint8 arrays under the cache root, keyed by a checksum of the source, never
inside the data folder. After that nothing touches PIL: batches are cut, augmented (4-px reflect-pad crop,
horizontal flip) and normalised as tensors on the training device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainables.hparams import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DATA_ENV = "DYNASTUDY_DATA"
OFFLINE_ENV = "DYNASTUDY_OFFLINE"


@dataclasses.dataclass
class DatasetArrays:
    """A whole dataset, decoded: images uint8 [N, H, W, 3], labels int64 [N]."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------------- sources

_PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar_pickles(dataset: str, root: Path) -> DatasetArrays:
    if dataset == "cifar10":
        train = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
        test = [_unpickle(root / "test_batch")]
        classes = tuple(_unpickle(root / "batches.meta")["label_names"])
        key = "labels"
    else:
        train, test = [_unpickle(root / "train")], [_unpickle(root / "test")]
        classes = tuple(_unpickle(root / "meta")["fine_label_names"])
        key = "fine_labels"

    def stack(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y

    (trx, try_), (tex, tey) = stack(train), stack(test)
    return DatasetArrays(dataset, classes, trx, try_, tex, tey)


def _decode(data: bytes, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _split_class_file(rel: str) -> tuple[str, str, str] | None:
    """('train'|'test', class, file) from a path ending in <split>/<class>/<file>, else None."""
    parts = rel.replace("\\", "/").split("/")
    if len(parts) < 3 or parts[-3] not in ("train", "test") or not parts[-1].lower().endswith(IMAGE_EXTS):
        return None
    return parts[-3], parts[-2], parts[-1]


def _assemble(name: str, items: list[tuple[str, str, str, bytes]], size: int) -> DatasetArrays:
    """items: (split, class, file, encoded bytes). Classes sorted by name; files in name order within a class."""
    classes = tuple(sorted({c for s, c, _, _ in items if s == "train"}))
    if not classes:
        raise ConfigError(f"no training images found for {name}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for s, c, _, _ in items if c not in index})
    if unknown:
        raise ConfigError(f"test classes {unknown} have no training images")
    items.sort(key=lambda it: (it[0], index[it[1]], it[2]))
    out = {}
    for split in ("train", "test"):
        sel = [it for it in items if it[0] == split]
        if not sel:
            raise ConfigError(f"no {split} images found for {name}")
        x = np.stack([_decode(it[3], size) for it in sel])
        y = np.array([index[it[1]] for it in sel], dtype=np.int64)
        out[split] = (x, y)
    return DatasetArrays(name, classes, out["train"][0], out["train"][1], out["test"][0], out["test"][1])


def _read_archive(name: str, path: Path, size: int) -> DatasetArrays:
    items = []
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.isfile() and (parsed := _split_class_file(member.name)):
                items.append((*parsed, tar.extractfile(member).read()))
    return _assemble(name, items, size)


def _read_folder(name: str, root: Path, size: int) -> DatasetArrays:
    items = []
    for split in ("train", "test"):
        for path in sorted((root / split).rglob("*")):
            if path.is_file() and (parsed := _split_class_file(str(path.relative_to(root)))):
                items.append((*parsed, path.read_bytes()))
    return _assemble(name, items, size)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _folder_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(cache_dir: Path, key: str, build) -> DatasetArrays:
    path = cache_dir / f"{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return DatasetArrays(str(z["name"]), tuple(str(c) for c in z["classes"]), z["train_x"], z["train_y"],
                                 z["test_x"], z["test_y"])
    arrays = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, name=arrays.name, classes=np.array(arrays.classes), train_x=arrays.train_x,
             train_y=arrays.train_y, test_x=arrays.test_x, test_y=arrays.test_y)
    os.replace(tmp, path)  # atomic: a concurrent reader sees no half-written cache
    return arrays


def locate(dataset: str, data_dir: str | os.PathLike | None) -> tuple[str, Path] | None:
    """The form of `dataset` found in `data_dir`: ('pickle'|'folder'|'archive', path), or None."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    if dataset == "imagefolder":
        return ("folder", root) if (root / "train").is_dir() and (root / "test").is_dir() else None
    candidates = [("pickle", root / _PICKLE_DIRS[dataset]), ("folder", root / dataset),
                  ("archive", root / f"{dataset}-jpeg.tar.gz")]
    if root.name == _PICKLE_DIRS[dataset]:
        candidates.insert(0, ("pickle", root))
    for form, path in candidates:
        if form == "archive" and path.is_file():
            return form, path
        if form == "pickle" and path.is_dir() and any(path.iterdir()):
            return form, path
        if form == "folder" and (path / "train").is_dir() and (path / "test").is_dir():
            return form, path
    return None


def _forms_text(dataset: str) -> str:
    if dataset == "imagefolder":
        return "train/<class>/<image> and test/<class>/<image>"
    return (f"{_PICKLE_DIRS[dataset]}/, {dataset}/{{train,test}}/<class>/<image>, "
            f"{dataset}-jpeg.tar.gz")


def check_source(dataset: str, data_dir: str | os.PathLike | None) -> None:
    """Fail early, with one line, when `dataset` cannot be found (and will not be downloaded)."""
    if dataset == "synthetic":
        return
    if data_dir is None:
        raise ConfigError(f"dataset {dataset} needs a data directory: pass --data-dir DIR or set {DATA_ENV}")
    if not Path(data_dir).is_dir():
        raise ConfigError(f"data directory {data_dir} does not exist; pass --data-dir DIR or set {DATA_ENV}")
    if locate(dataset, data_dir) is None and (dataset == "imagefolder" or os.environ.get(OFFLINE_ENV)):
        raise ConfigError(f"no {dataset} data in {data_dir} (looked for {_forms_text(dataset)}); "
                          f"pass --data-dir DIR or set {DATA_ENV}")


def load_dataset(dataset: str, data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike,
                 image_size: int = 32) -> DatasetArrays:
    """Load `dataset` from `data_dir`, decoding image forms once into `cache_dir`."""
    if dataset == "synthetic":
        return synthetic(image_size=image_size)
    check_source(dataset, data_dir)
    found = locate(dataset, data_dir)
    if found is None:
        found = _download(dataset, Path(data_dir))
    form, path = found
    if form == "pickle":
        if image_size != 32:
            raise ConfigError(f"data.image_size={image_size}: {dataset} pickles are 32x32 (the only choice: 32)")
        return _read_cifar_pickles(dataset, path)
    digest = _file_digest(path) if form == "archive" else _folder_digest(path)
    reader = _read_archive if form == "archive" else _read_folder
    return _cached(Path(cache_dir), f"{dataset}-{form}-{digest}-{image_size}px",
                   lambda: reader(dataset, path, image_size))


def _download(dataset: str, root: Path) -> tuple[str, Path]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as e:  # offline, or the server refused: say where we looked and how to fix it
        raise ConfigError(f"no {dataset} data in {root} (looked for {_forms_text(dataset)}) and the download "
                          f"failed ({type(e).__name__}); pass --data-dir DIR or set {DATA_ENV}") from None
    return "pickle", root / _PICKLE_DIRS[dataset]


def synthetic(num_classes: int = 10, n_train: int = 2000, n_test: int = 500, image_size: int = 32,
              seed: int = 0) -> DatasetArrays:
    """Random images with learnable structure: each class is a fixed smooth colour pattern, each image that
    pattern shifted, scaled and buried in noise. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(num_classes, 3, 4, 4)).astype(np.float32)
    patterns = F.interpolate(torch.from_numpy(low), size=(image_size, image_size), mode="bilinear",
                             align_corners=False).numpy()

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        shift = rng.integers(-3, 4, size=(n, 2))
        x = np.stack([np.roll(patterns[c], tuple(s), axis=(1, 2)) for c, s in zip(y, shift)])
        x = x * rng.uniform(0.5, 1.5, size=(n, 1, 1, 1)) + rng.normal(scale=1.0, size=x.shape)
        img = np.clip(128 + 40 * x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(img), y.astype(np.int64)

    (trx, try_), (tex, tey) = make(n_train), make(n_test)
    return DatasetArrays("synthetic", tuple(f"class{i}" for i in range(num_classes)), trx, try_, tex, tey)


# ---------------------------------------------------------------------------------------------------- splits

@dataclasses.dataclass
class Splits:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _per_class_counts(labels: np.ndarray, total: int, num_classes: int) -> np.ndarray:
    """Split `total` over classes in proportion to their sizes (largest remainder), capped by availability."""
    sizes = np.bincount(labels, minlength=num_classes)
    exact = total * sizes / max(sizes.sum(), 1)
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return np.minimum(counts, sizes)


def _stratified(labels: np.ndarray, total: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a stratified sample of `total` items (per class: a seeded permutation's first items)."""
    counts = _per_class_counts(labels, total, num_classes)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:counts[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def make_splits(arrays: DatasetArrays, hp) -> Splits:
    """The seeded, stratified train/validation split (`hp` is a DataHparams); subsets are class-balanced."""
    n, c = len(arrays.train_y), arrays.num_classes
    if hp.val_size >= n:
        raise ConfigError(f"data.val_size={hp.val_size} leaves no training images ({arrays.name} has {n})")
    rng = np.random.default_rng(hp.split_seed)
    val_idx = _stratified(arrays.train_y, hp.val_size, c, rng)
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    if hp.subset:
        if hp.subset > len(train_idx):
            raise ConfigError(f"data.subset={hp.subset} is larger than the training part ({len(train_idx)})")
        train_idx = train_idx[_stratified(arrays.train_y[train_idx], hp.subset, c, rng)]
    test_idx = np.arange(len(arrays.test_y))
    if hp.test_subset and hp.test_subset < len(test_idx):
        test_idx = _stratified(arrays.test_y, hp.test_subset, c, rng)
    return Splits(arrays.train_x[train_idx], arrays.train_y[train_idx], arrays.train_x[val_idx],
                  arrays.train_y[val_idx], arrays.test_x[test_idx], arrays.test_y[test_idx], arrays.classes)


# ---------------------------------------------------------------------------------------------------- batches

class Batches:
    """Minibatches of a split kept on the training device as uint8 NCHW.

    Each batch is cast, augmented and normalised as one tensor: no per-image Python work."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, device: torch.device | str,
                 mean: torch.Tensor, std: torch.Tensor, augment: bool = False, shuffle: bool = False,
                 channels_last: bool = False) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.batch_size, self.augment, self.shuffle = batch_size, augment, shuffle
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=generator).to(self.x.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            xb = self.x[idx].float().div_(255)
            if self.augment:
                xb = augment_batch(xb, generator)
            xb = ((xb - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield xb, self.y[idx]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop after reflect padding by `pad` pixels, and a random horizontal flip, per sample."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + offsets[0][:, None])  # [b, h]
    cols = (torch.arange(w, device=x.device)[None, :] + offsets[1][:, None])  # [b, w]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 moves the channel dim last: [b, h, w, c] -> back to NCHW.
    return padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def channel_stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale."""
    sample = x[:: max(1, len(x) // 5000)]  # 5k images estimate the statistics well, at 1/9 of the memory
    flat = torch.from_numpy(np.ascontiguousarray(sample).reshape(-1, x.shape[-1])).float().div_(255)
    return flat.mean(0), flat.std(0).clamp_min(1e-3)
