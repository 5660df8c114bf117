"""Dataset sources (pickle layout, image folder, archive), the decode cache, splits and batch augmentation."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables import data as data_lib
from trainables.config import DataHparams
from trainables.hparams import ConfigError

CLASSES = ("airplane", "automobile", "bird")


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % len(CLASSES)


def _write_pickles(root: Path) -> tuple[np.ndarray, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(6, i)
        xs.append(x), ys.append(y)
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(6, -1), "labels": y.tolist()}, f)
    x, y = _images(3, 9)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(3, -1), "labels": y.tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    return np.concatenate(xs), np.concatenate(ys)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so decoded pixels can be compared exactly
    return buf.getvalue()


def _write_folder(root: Path) -> dict[str, np.ndarray]:
    first = {}
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            x, _ = _images(n, 10 * c + len(split))
            for i in range(n):
                (d / f"{i:04d}.png").write_bytes(_png(x[i]))
            first[f"{split}/{name}"] = x[0]
    return first


def test_reads_the_pickle_layout(tmp_path):
    x, y = _write_pickles(tmp_path)
    arrays = data_lib.load_dataset("cifar10", tmp_path, tmp_path / "cache")
    assert arrays.classes == CLASSES
    assert np.array_equal(arrays.train_x, x) and np.array_equal(arrays.train_y, y)
    assert arrays.test_x.shape == (3, 32, 32, 3)
    assert not (tmp_path / "cache").exists()  # pickles need no decode cache


def test_reads_image_folder_and_archive_and_caches(tmp_path, monkeypatch):
    first = _write_folder(tmp_path / "src" / "cifar10")
    arrays = data_lib.load_dataset("cifar10", tmp_path / "src", tmp_path / "cache")
    assert arrays.classes == CLASSES and arrays.train_x.shape == (12, 32, 32, 3) and len(arrays.test_y) == 6
    assert np.array_equal(arrays.train_x[0], first["train/airplane"])
    assert np.array_equal(arrays.train_x[4], first["train/automobile"]) and arrays.train_y[4] == 1

    archive = tmp_path / "arch" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    from_archive = data_lib.load_dataset("cifar10", archive.parent, tmp_path / "cache")
    assert np.array_equal(from_archive.train_x, arrays.train_x)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one per source, keyed by its checksum

    # A second load reads the cache and decodes nothing.
    monkeypatch.setattr(data_lib, "_decode", lambda *a: pytest.fail("decoded again"))
    again = data_lib.load_dataset("cifar10", archive.parent, tmp_path / "cache")
    assert np.array_equal(again.test_x, arrays.test_x)


def test_imagefolder_resizes(tmp_path):
    root = tmp_path / "mine"
    for split in ("train", "test"):
        for name in ("cats", "dogs"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (50, 40), (200, 10, 10)).save(root / split / name / "a.jpg")
    arrays = data_lib.load_dataset("imagefolder", root, tmp_path / "cache", image_size=24)
    assert arrays.classes == ("cats", "dogs") and arrays.train_x.shape == (2, 24, 24, 3)


def test_missing_data_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv(data_lib.OFFLINE_ENV, "1")
    with pytest.raises(ConfigError) as e:
        data_lib.load_dataset("cifar10", tmp_path, tmp_path / "cache")
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py/" in msg and "cifar10-jpeg.tar.gz" in msg
    assert "DYNASTUDY_DATA" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="needs a data directory"):
        data_lib.check_source("cifar10", None)


def test_split_is_stratified_seeded_and_disjoint():
    arrays = data_lib.synthetic(n_train=1000, n_test=200)
    hp = DataHparams(dataset="synthetic", val_size=200, subset=300, test_subset=50)
    a, b = data_lib.make_splits(arrays, hp), data_lib.make_splits(arrays, hp)
    assert np.array_equal(a.val_x, b.val_x) and np.array_equal(a.train_x, b.train_x)
    assert np.bincount(a.val_y).tolist() == [20] * 10
    assert np.bincount(a.train_y).tolist() == [30] * 10 and np.bincount(a.test_y).tolist() == [5] * 10
    train_rows = {r.tobytes() for r in a.train_x}
    assert not any(r.tobytes() in train_rows for r in a.val_x)
    other = data_lib.make_splits(arrays, DataHparams(dataset="synthetic", val_size=200, split_seed=1))
    assert not np.array_equal(other.val_x, a.val_x)
    with pytest.raises(ConfigError, match="data.val_size=1000"):
        data_lib.make_splits(arrays, DataHparams(dataset="synthetic", val_size=1000))


def test_augment_batch_is_a_crop_of_the_padded_image_or_its_mirror():
    x = torch.rand(64, 3, 8, 8)
    out = data_lib.augment_batch(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(64):
        crops = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], cr) or torch.equal(out[i], cr.flip(-1)) for cr in crops)
    flipped = sum(not any(torch.equal(out[i], cr) for cr in
                          [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]) for i in range(64))
    assert 10 < flipped < 54  # about half the batch is mirrored


def test_batches_cover_the_split_once_per_epoch():
    arrays = data_lib.synthetic(n_train=100, n_test=10)
    mean, std = data_lib.channel_stats(arrays.train_x)
    b = data_lib.Batches(arrays.train_x, arrays.train_y, 32, "cpu", mean, std, augment=True, shuffle=True)
    ys = torch.cat([y for _, y in b.epoch(torch.Generator().manual_seed(0))])
    assert len(b) == 4 and sorted(ys.tolist()) == sorted(arrays.train_y.tolist())


def test_one_cache_can_serve_every_results_folder(monkeypatch, tmp_path):
    from study import paths

    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    assert paths.cache_dir(tmp_path / "a") == tmp_path / "a" / "cache"
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "shared"))
    assert paths.cache_dir(tmp_path / "a") == paths.cache_dir(tmp_path / "b") == tmp_path / "shared"
