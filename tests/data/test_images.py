"""Image data: CIFAR-10 pickle folders and IDX files built here, augmentation, normalization, loaders."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from shardwise.data import images as im
from shardwise.data.images import (
    DEBIAN_FASHION_MNIST_DIR,
    DataNotFoundError,
    ImageTensorDataset,
    augment_batch,
    channel_stats,
    load_cifar10,
    load_fashion_mnist,
    load_image_data,
    make_loader,
    read_idx,
)

# ------------------------------------------------------------------------------------------- fixtures


def write_cifar_folder(folder, per_batch=6, seed=0):
    """A CIFAR-10 python folder in the real format: b'data' (N, 3072) uint8 rows R|G|B, b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        out[name] = (data, labels)
    names = [f"class{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return out


def write_idx(path, array, gz=False):
    arr = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


def write_fmnist_folder(folder, n_train=8, n_test=4, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    sfx = ".gz" if gz else ""
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zeros: padding is recognisable
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", y, gz)
        out[split] = (x, y)
    return out


# ------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_folder_roundtrip(tmp_path):
    raw = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(tmp_path / "cifar-10-batches-py", allow_hub=False)
    assert d.train_images.shape == (30, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (6, 3, 32, 32)
    want = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(d.train_images.numpy(), want)
    # row layout: the first 1024 bytes are the red plane, row-major
    assert d.train_images[0, 0, 0, 1].item() == raw["data_batch_1"][0][0, 1]
    assert d.train_images[0, 2, 31, 31].item() == raw["data_batch_1"][0][0, 3071]
    assert d.test_labels.tolist() == raw["test_batch"][1]
    assert d.classes == tuple(f"class{i}" for i in range(10))
    assert d.source.endswith("cifar-10-batches-py")


def test_cifar_parent_folder_and_env_var(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    assert len(load_cifar10(tmp_path, allow_hub=False).train_labels) == 30
    monkeypatch.setenv(im.CIFAR10_ENV, str(tmp_path))
    assert len(load_image_data("cifar10", allow_hub=False).test_labels) == 6


def test_cifar_statistics_are_from_the_training_split(tmp_path):
    write_cifar_folder(tmp_path / "c")
    d = load_cifar10(tmp_path / "c", allow_hub=False)
    x = d.train_images.double() / 255
    assert np.allclose(d.mean, x.mean((0, 2, 3)).numpy(), atol=1e-12)
    assert np.allclose(d.std, x.std((0, 2, 3), correction=0).numpy(), atol=1e-9)


def test_cifar_missing_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(im.CIFAR10_ENV, raising=False)
    with pytest.raises(DataNotFoundError) as e:
        load_cifar10(tmp_path / "nowhere", allow_hub=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg
    assert "cifar-10-python.tar.gz" in msg and im.CIFAR10_ENV in msg and "data.root" in msg
    with pytest.raises(DataNotFoundError, match="no folder given"):
        load_cifar10(None, allow_hub=False)


def test_cifar_bad_pickle_is_a_clear_error(tmp_path):
    write_cifar_folder(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"something": 1}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path / "c", allow_hub=False)


# ------------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a, gz)
    assert np.array_equal(read_idx(p), a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match="not uint8"):
        read_idx(tmp_path / "float")


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_is_padded_and_repeated_to_3x32x32(tmp_path, gz):
    raw = write_fmnist_folder(tmp_path / "f", gz=gz)
    d = load_fashion_mnist(tmp_path / "f")
    assert d.train_images.shape == (8, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
    x = d.train_images
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert np.array_equal(x[:, 0, 2:30, 2:30].numpy(), raw["train"][0])
    border = x.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.count_nonzero() == 0
    assert d.test_labels.tolist() == raw["t10k"][1].tolist()
    assert d.test_labels.dtype == torch.int64
    assert d.mean[0] == d.mean[1] == d.mean[2]


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    write_fmnist_folder(tmp_path / "f")
    monkeypatch.setenv(im.FASHION_MNIST_ENV, str(tmp_path / "f"))
    assert len(load_image_data("fashion_mnist").train_labels) == 8


def test_fashion_mnist_missing_names_the_debian_package(tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    write_idx(tmp_path / "f" / "train-images-idx3-ubyte", np.zeros((1, 28, 28)))  # incomplete folder
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist(tmp_path / "f")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "f") in msg
    assert "t10k-labels-idx1-ubyte" in msg and im.FASHION_MNIST_ENV in msg
    monkeypatch.delenv(im.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(im, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError, match="not-installed"):
        load_fashion_mnist()


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown image dataset: 'mnist'"):
        load_image_data("mnist")


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)
def test_debian_fashion_mnist():
    d = load_fashion_mnist()
    assert d.train_images.shape == (60_000, 3, 32, 32) and d.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(d.train_labels).tolist() == [6000] * 10
    assert 0.2 < d.mean[0] < 0.25 and 0.3 < d.std[0] < 0.36  # 28x28 stats ~0.286/0.353, diluted by padding
    s = d.subset(500, 100, seed=3)
    assert len(s.train_labels) == 500 and len(s.test_labels) == 100 and s.mean == d.mean
    assert torch.equal(s.train_images, d.subset(500, 100, seed=3).train_images)


# ------------------------------------------------------------------------------------------- transforms


def test_channel_stats_matches_numpy():
    x = torch.randint(0, 256, (5000, 3, 8, 8), dtype=torch.uint8)  # > one 4096 chunk
    mean, std = channel_stats(x)
    ref = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, ref.mean((0, 2, 3)), atol=1e-12)
    assert np.allclose(std, ref.std((0, 2, 3)), atol=1e-9)


def _find_crop(padded, out):
    """All (dy, dx, flip) such that `out` is that crop (flipped or not) of `padded`."""
    _, hp, wp = padded.shape
    h, w = out.shape[1:]
    hits = []
    for dy in range(hp - h + 1):
        for dx in range(wp - w + 1):
            win = padded[:, dy : dy + h, dx : dx + w]
            hits += [(dy, dx, False)] if torch.equal(win, out) else []
            hits += [(dy, dx, True)] if torch.equal(win.flip(-1), out) else []
    return hits


def test_augment_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=g)
    out = augment_batch(x, pad=4, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    seen = set()
    for i in range(len(x)):
        hits = _find_crop(torch.nn.functional.pad(x[i], (4, 4, 4, 4)), out[i])
        assert len(hits) == 1, f"sample {i}: {hits}"
        seen.add(hits[0])
    flips = {f for _, _, f in seen}
    offsets = {dy for dy, _, _ in seen} | {dx for _, dx, _ in seen}
    assert flips == {False, True} and min(offsets) == 0 and max(offsets) == 8 and len(offsets) > 5


def test_augment_without_padding_only_flips_and_is_seeded():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = augment_batch(x, pad=0, generator=torch.Generator().manual_seed(0))
    for a, b in zip(x, out, strict=True):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    again = augment_batch(x, pad=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_dataset_normalizes_and_loader_covers_every_sample_once():
    n = 50
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # an id in a pixel
    y = torch.arange(n) % 10
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = ImageTensorDataset(x, y, mean, std, train=False)
    xb, yb = ds.__getitems__([3, 7])
    ref = (x[[3, 7]].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert xb.dtype == torch.float32 and torch.allclose(xb, ref) and yb.tolist() == [3, 7]
    assert torch.equal(ds[5][0], ds.__getitems__([5])[0][0])

    loader = make_loader(ds, 16, shuffle=True, seed=0)
    sizes, ids, labels = [], [], []
    for xb, yb in loader:
        sizes.append(len(yb))
        pixel = (xb[:, 0, 0, 0] * std[0] + mean[0]) * 255
        ids += pixel.round().long().tolist()
        labels += yb.tolist()
    assert sizes == [16, 16, 16, 2] and sorted(ids) == list(range(n))
    assert labels == [i % 10 for i in ids] and ids != sorted(ids)
    assert [len(b[1]) for b in make_loader(ds, 16, shuffle=False, drop_last=True)] == [16, 16, 16]


def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), (0,), (1,), train=True)
