"""32x32 image classification data in plain torch: CIFAR-10 and Fashion-MNIST (no torchvision).

Sources, tried in this order (the first that exists wins; nothing is downloaded behind your back):

- CIFAR-10: the standard python-pickle folder `cifar-10-batches-py/` (data_batch_1..5, test_batch;
  https://www.cs.toronto.edu/~kriz/cifar.html) at `root`, else at $SHARDWISE_CIFAR10_DIR, else the
  Hugging Face dataset `uoft-cs/cifar10` through `datasets.load_dataset` when `allow_hub` is set and a
  hub is reachable.
- Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): the four IDX files (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-...`, optionally `.gz`) at `root`, else $SHARDWISE_FASHION_MNIST_DIR,
  else /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`). The 28x28 grey
  images are zero-padded to 32x32 and the channel repeated three times, so one 3x32x32 model reads
  both datasets.

Images stay uint8 (N, 3, 32, 32) in memory; a batch is augmented and normalized when it is fetched:

- augmentation (training split only), as torchvision's `RandomCrop(32, padding=4)` +
  `RandomHorizontalFlip()` applied before `ToTensor()`: zero-pad by 4 on each side, take a random 32x32
  window, mirror it left-right with probability 1/2. Done for a whole batch with one gather.
- normalization: x = (pixel / 255 - mean_c) / std_c with per-channel mean and std of the training split
  (computed on load, so padded Fashion-MNIST gets its own statistics).

`ImageTensorDataset.__getitems__` returns a whole batch, so a `torch.utils.data.DataLoader` built with
`make_loader` costs one gather per batch, and `accelerate.Accelerator.prepare` can shard it as usual.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shardwise.errors import DataNotFoundError

__all__ = [
    "CIFAR10_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DataNotFoundError",
    "ImageData",
    "ImageDataConfig",
    "ImageTensorDataset",
    "augment_batch",
    "channel_stats",
    "load_cifar10",
    "load_fashion_mnist",
    "load_image_data",
    "load_images",
    "make_loader",
    "read_idx",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_ENV = "SHARDWISE_CIFAR10_DIR"
FASHION_MNIST_ENV = "SHARDWISE_FASHION_MNIST_DIR"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageData:
    """Both splits of a dataset as uint8 (N, 3, 32, 32) images and int64 labels, plus train statistics."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def summary(self) -> str:
        """One line: name, source, split sizes, normalization statistics."""
        mean, std = [round(m, 4) for m in self.mean], [round(v, 4) for v in self.std]
        n_train, n_test = len(self.train_labels), len(self.test_labels)
        return (
            f"{self.name} from {self.source}: {n_train} train / {n_test} test images, mean {mean}, std {std}"
        )

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> ImageData:
        """A random subset of each split (same seed, same subset); None keeps a split whole.

        Statistics are kept from the full training split, so a subset is normalized like the whole.
        """
        g = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(y):
                return x, y
            if n < 1:
                raise ValueError(f"Invalid subset size: {n}")
            idx = torch.randperm(len(y), generator=g)[:n].sort().values
            return x[idx], y[idx]

        tr_x, tr_y = pick(self.train_images, self.train_labels, n_train)
        te_x, te_y = pick(self.test_images, self.test_labels, n_test)
        return ImageData(self.name, tr_x, tr_y, te_x, te_y, self.classes, self.mean, self.std, self.source)


# ---------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format, optionally gzipped) into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8 is the only one MNIST-style data uses), the number
    of dimensions d, then d big-endian uint32 sizes; the data follows in C order.
    """
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type code {raw[2]:#x} is not uint8 (0x08)")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {shape} = {expected} bytes, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fmnist_dir_ok(folder: Path) -> bool:
    return all(_find_idx(folder, s) for pair in _FMNIST_FILES.values() for s in pair)


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST as 3x32x32 uint8: 28x28 zero-padded by 2 on each side, grey channel repeated."""
    candidates: list[tuple[str, Path]] = []
    if root is not None:
        candidates.append(("root", Path(root)))
    elif os.environ.get(FASHION_MNIST_ENV):
        candidates.append((f"${FASHION_MNIST_ENV}", Path(os.environ[FASHION_MNIST_ENV])))
    else:
        candidates.append(("Debian package dataset-fashion-mnist", DEBIAN_FASHION_MNIST_DIR))
    for _, folder in candidates:
        if folder.is_dir() and _fmnist_dir_ok(folder):
            break
    else:
        looked = "; ".join(f"{folder} ({why})" for why, folder in candidates)
        names = ", ".join(f"{s}[.gz]" for pair in _FMNIST_FILES.values() for s in pair)
        raise DataNotFoundError(
            f"Fashion-MNIST not found. Looked in: {looked}. Install it with `sudo apt-get install "
            f"dataset-fashion-mnist` (files land in {DEBIAN_FASHION_MNIST_DIR}), or put "
            f"{names} (from https://github.com/zalandoresearch/fashion-mnist) in a folder and pass it as "
            f"data.root or set ${FASHION_MNIST_ENV}."
        )

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        img_stem, lab_stem = _FMNIST_FILES[name]
        images = read_idx(_find_idx(folder, img_stem))  # type: ignore[arg-type]
        labels = read_idx(_find_idx(folder, lab_stem))  # type: ignore[arg-type]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise ValueError(f"{folder}: unexpected Fashion-MNIST shapes {images.shape} / {labels.shape}")
        x = torch.nn.functional.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2))  # (N, 32, 32)
        return x.unsqueeze(1).expand(-1, 3, -1, -1), torch.from_numpy(labels.astype(np.int64))

    return _with_stats("fashion_mnist", *split("train"), *split("test"), FASHION_MNIST_CLASSES, str(folder))


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    d = _unpickle(path)
    data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (keys {sorted(d)})")
    x = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.tensor(labels, dtype=torch.int64)


def _cifar_dir_ok(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE))


def _cifar_from_folder(folder: Path) -> ImageData:
    parts = [_cifar_batch(folder / f) for f in _CIFAR_TRAIN_FILES]
    tr_x, tr_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    te_x, te_y = _cifar_batch(folder / _CIFAR_TEST_FILE)
    classes = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        names = meta.get(b"label_names", meta.get("label_names"))
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
    return _with_stats("cifar10", tr_x, tr_y, te_x, te_y, classes, str(folder))


def _cifar_from_hub(hub_id: str) -> ImageData:
    import datasets  # imported here: only this path needs it

    ds = datasets.load_dataset(hub_id)
    out = []
    for name in ("train", "test"):
        split = ds[name].with_format("numpy")
        img_col = "img" if "img" in split.column_names else "image"
        x = torch.from_numpy(np.stack(list(split[img_col]))).permute(0, 3, 1, 2).contiguous()
        out += [x, torch.as_tensor(split["label"], dtype=torch.int64)]
    return _with_stats("cifar10", *out, CIFAR10_CLASSES, f"hub:{hub_id}")


def load_cifar10(root: str | os.PathLike | None = None, *, allow_hub: bool = True) -> ImageData:
    """CIFAR-10 from a python-pickle folder (root, then $SHARDWISE_CIFAR10_DIR), else from the hub."""
    looked = []
    for why, value in (("root", root), (f"${CIFAR10_ENV}", os.environ.get(CIFAR10_ENV))):
        if not value:
            continue
        folder = Path(value)
        # Accept the parent of the extracted archive too (where cifar-10-python.tar.gz was unpacked).
        for f in (folder, folder / "cifar-10-batches-py"):
            if _cifar_dir_ok(f):
                return _cifar_from_folder(f)
        looked.append(f"{folder} ({why})")
        if why == "root":
            break  # an explicit root that is wrong is an error, not a reason to look elsewhere
    hub_error = ""
    if allow_hub and root is None:
        try:
            return _cifar_from_hub(CIFAR10_HUB_ID)
        except Exception as e:  # offline, no cache, no datasets: fall through to the message
            hub_error = f" The hub ({CIFAR10_HUB_ID}) failed: {type(e).__name__}: {str(e)[:200]}."
    files = ", ".join((*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE))
    raise DataNotFoundError(
        f"CIFAR-10 not found. Looked in: {'; '.join(looked) or 'no folder given'}.{hub_error} Download "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it, and pass the "
        f"cifar-10-batches-py folder (holding {files}) as data.root or set ${CIFAR10_ENV}."
    )


@dataclass
class ImageDataConfig:
    """The ``data`` section of an image recipe (CIFAR-10 or Fashion-MNIST, optionally a subset)."""

    dataset: Literal["cifar10", "fashion_mnist"] = "cifar10"
    # a cifar-10-batches-py folder / a folder of Fashion-MNIST IDX files; None = env var, Debian path, hub
    root: str | None = None
    allow_hub: bool = True  # CIFAR-10 only: datasets.load_dataset("uoft-cs/cifar10") when no folder
    train_subset: int | None = None  # random subset sizes (None = whole split), drawn with subset_seed
    test_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True  # random crop (pad 4) + horizontal flip on the training split


def load_images(cfg: ImageDataConfig) -> ImageData:
    """The data set ``cfg`` names, from the first place it is found, cut to the configured subsets."""
    data = load_image_data(cfg.dataset, cfg.root, allow_hub=cfg.allow_hub)
    return data.subset(cfg.train_subset, cfg.test_subset, seed=cfg.subset_seed)


def load_image_data(name: str, root: str | os.PathLike | None = None, *, allow_hub: bool = True) -> ImageData:
    """Dispatch by dataset name: "cifar10" or "fashion_mnist"."""
    if name == "cifar10":
        return load_cifar10(root, allow_hub=allow_hub)
    if name == "fashion_mnist":
        return load_fashion_mnist(root)
    raise ValueError(f"Unknown image dataset: {name!r} (expected 'cifar10' or 'fashion_mnist')")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images on the [0, 1] scale."""
    # Sums accumulated in float64 chunks: no float copy of the whole set, no float32 round-off.
    s = torch.zeros(images.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in images.split(4096):
        c = chunk.to(torch.float64).div_(255.0)
        s += c.sum((0, 2, 3))
        s2 += c.square().sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    return tuple(mean.tolist()), tuple((s2 / n - mean.square()).clamp_min(0).sqrt().tolist())


def _with_stats(name, tr_x, tr_y, te_x, te_y, classes, source) -> ImageData:
    mean, std = channel_stats(tr_x)
    return ImageData(name, tr_x, tr_y, te_x, te_y, tuple(classes), mean, std, source)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# augmentation, normalization, loaders
# ---------------------------------------------------------------------------------------------------------


def augment_batch(
    images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding `pad` + random horizontal flip, for a (B, C, H, W) batch at once.

    Each sample gets offsets (dy, dx) uniform in [0, 2*pad] into the padded image and a coin for the flip;
    the output pixel (i, j) is padded[dy + i, dx + j], or padded[dy + i, dx + W - 1 - j] when flipped,
    gathered with one advanced-indexing call.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # (B, W)
    rows = torch.arange(h, device=dev) + dy[:, None]  # (B, H)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # advanced dims first: (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class ImageTensorDataset(Dataset):
    """uint8 images + labels, fetched a batch at a time, augmented (if `train`) and normalized to float32.

    `seed` gives the augmentation its own generator; None draws from torch's global RNG instead.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        seed: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} != ({images.shape[0]},)")
        self.images, self.labels, self.train = images, labels, train
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # None: augment from torch's global RNG, which `accelerate` seeds and saves in checkpoints
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx]
        if self.train:
            x = augment_batch(x, generator=self.generator)
        x = (x.to(torch.float32).div_(255.0) - self.mean) / self.std
        return x, self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _batch_is_collated(batch):
    return batch


def make_loader(
    dataset: ImageTensorDataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose batches come from one `__getitems__` call (no per-sample collate)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=g,
        collate_fn=_batch_is_collated,
    )
