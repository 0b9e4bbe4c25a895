"""Data sets as raw uint8 images (NHWC) plus labels, and the preprocessing that turns them into model inputs.

Names: ``digits`` (scikit-learn's 8x8 handwritten digits, the embedded default), ``cifar10`` / ``cifar100``
(torchvision, downloaded on first use into ``--root``), ``npz:PATH`` (arrays ``x`` uint8 [N, H, W, C] and ``y``; a
folder holding ``train.npz`` and ``val.npz`` uses that split), ``imagefolder:PATH`` (ImageNet layout: ``PATH/train``
and ``PATH/val`` with one folder per class). Raw images are kept as uint8 and preprocessed by the same numpy code
(``tmlp.runtime.run.preprocess``) that runs on the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tmlp.errors import TmlpError
from tmlp.io import data_root
from tmlp.runtime.run import preprocess

__all__ = ["DataSet", "ImageSplit", "augment_batch", "load_dataset", "to_tensor"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "npz:PATH", "imagefolder:PATH")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSplit:
    """Raw images ``x`` uint8 [N, H, W, C] and labels ``y`` int64 [N] (in memory), or a lazy torchvision folder."""

    x: np.ndarray | None
    y: np.ndarray
    folder: Any = None  # torchvision ImageFolder for imagefolder:PATH (decoded lazily)
    size: int = 0  # the fixed size folder images are cropped to
    rows: np.ndarray | None = None  # the folder's images this split holds (None: all)

    def __len__(self) -> int:
        return len(self.y)

    def images(self, index: np.ndarray) -> np.ndarray:
        """uint8 [len(index), H, W, C] for the rows ``index``."""
        if self.x is not None:
            return self.x[index]
        rows = np.asarray(index) if self.rows is None else self.rows[np.asarray(index)]
        if not len(rows):  # a rank's empty share of a small last batch (torchrun)
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return np.stack([_load_folder_image(self.folder, int(i), self.size) for i in rows])

    def subset(self, start: int, stop: int) -> "ImageSplit":
        """Rows ``start:stop`` as a split of their own (a view; folder images stay lazy)."""
        if self.x is not None:
            return ImageSplit(self.x[start:stop], self.y[start:stop])
        rows = (np.arange(len(self)) if self.rows is None else self.rows)[start:stop]
        return ImageSplit(None, self.y[start:stop], self.folder, self.size, rows)


@dataclass
class DataSet:
    """Train and validation splits with what the model needs to know about them."""

    name: str
    train: ImageSplit
    val: ImageSplit
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "crop_flip" (natural images), "crop" (digits: no flip) or "none"

    def preprocessing(self, input_size: tuple[int, int]) -> dict[str, Any]:
        """The spec stored in the ONNX metadata and applied by runtime/run.py: raw uint8 NHWC -> float NCHW."""
        return {"input_size": [int(input_size[0]), int(input_size[1])], "channels": self.channels,
                "scale": 1.0 / 255.0, "mean": list(self.mean), "std": list(self.std), "resize": "bilinear",
                "layout": "NCHW", "source": "uint8 NHWC", "dataset": self.name}


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/validation split of range(n)."""
    if not 0.0 < val_fraction < 1.0:
        raise TmlpError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_arrays(x: np.ndarray, y: np.ndarray, where: str, num_classes: int | None = None) -> None:
    """Raise a one-line TmlpError unless x is uint8 [N, H, W, C] (C in 1, 3) and y integer labels in range."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise TmlpError(f"{where}: x must be uint8 [N, H, W, C] with C = 1 or 3, got {x.dtype} {list(x.shape)}; "
                        "save raw images, not normalised floats")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise TmlpError(f"{where}: y must be integer labels of shape [{len(x)}], got {y.dtype} {list(y.shape)}")
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise TmlpError(f"{where}: labels must lie in [0, {num_classes or 'classes'}), found {y.min()}..{y.max()}")


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise TmlpError(f"data file {path!r} does not exist; pass npz:PATH to an .npz with arrays x and y")
    try:
        with np.load(path) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise TmlpError(f"{path!r} lacks arrays {sorted(missing)}; save x (uint8 NHWC) and y (labels)")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError) as err:
        raise TmlpError(f"cannot read {path!r} as .npz ({type(err).__name__}); write it with numpy.savez") from None
    check_arrays(x, y, path)
    return x, y.astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    return x, bunch.target.astype(np.int64)


def _cifar(name: str, root: str, download: bool) -> tuple[ImageSplit, ImageSplit, int]:
    from tmlp.download import CIFAR_FOLDERS, download_dataset, read_cifar

    folder = os.path.join(root, CIFAR_FOLDERS[name])
    if not os.path.isdir(folder):
        if not download:
            raise TmlpError(f"{name} not found in {folder!r}; run `tmlp data download --dataset {name} --dir {root}`"
                            " or pass --download")
        download_dataset(name, root)
    (x_tr, y_tr), (x_te, y_te) = read_cifar(folder, name)
    return ImageSplit(x_tr, y_tr), ImageSplit(x_te, y_te), 10 if name == "cifar10" else 100


def _load_folder_image(folder: Any, index: int, size: int) -> np.ndarray:
    """Decode one image, resize its shorter side to size/0.875 and centre-crop size x size; uint8 [size, size, 3]."""
    from PIL import Image

    path, _ = folder.samples[index]
    with Image.open(path) as im:
        im = im.convert("RGB")
        short = int(round(size / 0.875))
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _imagefolder(path: str, size: int) -> tuple[ImageSplit, ImageSplit, int]:
    from torchvision.datasets import ImageFolder

    folders = [os.path.join(path, part) for part in ("train", "val")]
    for folder in folders:
        if not os.path.isdir(folder):
            raise TmlpError(f"imagefolder:{path} needs {folder!r} with one sub-folder per class (ImageNet layout)")
    splits = []
    for folder in folders:
        try:
            ds = ImageFolder(folder)
        except (FileNotFoundError, OSError) as err:
            raise TmlpError(f"imagefolder:{path}: {err}; put images in one sub-folder per class") from None
        splits.append(ImageSplit(None, np.asarray(ds.targets, dtype=np.int64), folder=ds, size=size))
    if splits[0].folder.classes != splits[1].folder.classes:
        raise TmlpError(f"imagefolder:{path}: train and val hold different class folders; make them match")
    return splits[0], splits[1], len(splits[0].folder.classes)


def load_dataset(spec: str, root: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                 download: bool = False, image_size: int = 224) -> DataSet:
    """Load data set ``spec`` (see module docstring) with a held-out validation split.

    Data sets without their own validation split (digits, npz:FILE) hold out ``val_fraction`` of the training rows
    with ``seed``; cifar10/100 hold out the same fraction of their training set (the official test split stays
    untouched for independent checks); a folder with train.npz/val.npz and imagefolder use the split they carry.
    """
    root = root or data_root()
    if spec == "digits":
        x, y = _digits()
        tr, va = split_indices(len(x), val_fraction, seed)
        return DataSet("digits", ImageSplit(x[tr], y[tr]), ImageSplit(x[va], y[va]), 10, 1, (0.5,), (0.5,), "crop")
    if spec in ("cifar10", "cifar100"):
        train, _, classes = _cifar(spec, root, download)
        tr, va = split_indices(len(train), val_fraction, seed)
        return DataSet(spec, ImageSplit(train.x[tr], train.y[tr]), ImageSplit(train.x[va], train.y[va]), classes, 3,
                       CIFAR_MEAN, CIFAR_STD, "crop_flip")
    if spec.startswith("npz:"):
        path = spec[4:]
        if os.path.isdir(path):
            x_tr, y_tr = _read_npz(os.path.join(path, "train.npz"))
            x_va, y_va = _read_npz(os.path.join(path, "val.npz"))
        else:
            x, y = _read_npz(path)
            tr, va = split_indices(len(x), val_fraction, seed)
            x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
        if x_tr.shape[1:] != x_va.shape[1:]:
            raise TmlpError(f"{path}: train images {list(x_tr.shape[1:])} and val images {list(x_va.shape[1:])} differ")
        classes = int(max(y_tr.max(), y_va.max())) + 1
        rgb = x_tr.shape[-1] == 3
        return DataSet(f"npz:{path}", ImageSplit(x_tr, y_tr), ImageSplit(x_va, y_va), classes, x_tr.shape[-1],
                       CIFAR_MEAN if rgb else (0.5,), CIFAR_STD if rgb else (0.5,), "crop_flip" if rgb else "crop")
    if spec.startswith("imagefolder:"):
        train, val, classes = _imagefolder(spec[len("imagefolder:"):], image_size)
        return DataSet(spec, train, val, classes, 3, IMAGENET_MEAN, IMAGENET_STD, "crop_flip")
    raise TmlpError(f"unknown data set {spec!r}; choose one of {', '.join(DATASET_NAMES)}")


# ---------------------------------------------------------------------------------------------------------------------
# Batches for PyTorch
# ---------------------------------------------------------------------------------------------------------------------
def to_tensor(images: np.ndarray, spec: dict[str, Any]) -> torch.Tensor:
    """Raw uint8 [N, H, W, C] -> float32 [N, C, H', W'] with the same numpy code runtime/run.py uses."""
    return torch.from_numpy(preprocess(images, spec))


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` (at most H/8), plus a horizontal flip for ``crop_flip``;
    float [N, C, H, W] -> same shape."""
    if mode == "none":
        return x
    n, c, h, w = x.shape
    pad = max(1, min(pad, h // 8))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(h)  # [N, H]
    cols = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(w)  # [N, W]
    if mode == "crop_flip":
        flip = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
