"""Downloading data sets: the CIFAR archives torchvision knows (URL and MD5 from torchvision's own classes),
fetched with torchvision's download utilities, checked, extracted and read back in their pickle format."""
from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np

from tmlp.errors import TmlpError
from tmlp.io import data_root, folder_kept_on_success

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def cifar_source(name: str) -> tuple[str, str, str]:
    """(url, archive file name, md5) of a CIFAR archive, as torchvision records them."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    return cls.url, cls.filename, cls.tgz_md5


def download_dataset(name: str, root: str | None = None, url: str | None = None, md5: str | None = None) -> str:
    """Download and extract data set ``name`` under ``root``; returns the extracted folder. ``url``/``md5``
    replace the official archive (a mirror). Already present and readable: nothing is downloaded."""
    root = root or data_root()
    if name == "digits":
        from sklearn.datasets import load_digits

        load_digits()
        return "scikit-learn (bundled with the package, nothing to download)"
    if name not in CIFAR_FOLDERS:
        raise TmlpError(f"no download for {name!r}; choose cifar10, cifar100 or digits (ImageNet: use "
                        "imagefolder:PATH with your own copy)")
    folder = os.path.join(root, CIFAR_FOLDERS[name])
    if os.path.isdir(folder):
        try:
            read_cifar(folder, name)
            return folder
        except TmlpError:
            pass  # damaged: download again
    official_url, filename, official_md5 = cifar_source(name)
    url, md5 = url or official_url, md5 or (official_md5 if url is None else None)
    with folder_kept_on_success(root, "--dir"):  # a failed download leaves no new empty folder
        return _fetch_and_extract(name, root, folder, url, filename, md5)


def _fetch_and_extract(name: str, root: str, folder: str, url: str, filename: str, md5: str | None) -> str:
    """Download ``url`` into ``root``, check its MD5, extract it to ``folder`` and read it back; returns ``folder``."""
    from torchvision.datasets.utils import check_integrity, download_url

    archive = os.path.join(root, os.path.basename(url) or filename)
    try:
        download_url(url, root, os.path.basename(archive), md5)
    except Exception as err:  # URLError, HTTPError, RuntimeError("File not found or corrupted.")
        raise TmlpError(f"cannot download {name} from {url} ({type(err).__name__}: {str(err)[:120]}); check the "
                        "network or pass --dir with a copy") from None
    if md5 and not check_integrity(archive, md5):
        os.unlink(archive)
        raise TmlpError(f"{archive} failed its MD5 check (expected {md5}); the download was damaged: run again")
    tmp = folder + ".partial"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise TmlpError(f"{archive} is not a readable .tar.gz ({err}); delete it and download again") from None
    inner = os.path.join(tmp, CIFAR_FOLDERS[name])
    if not os.path.isdir(inner):
        raise TmlpError(f"{archive} does not contain {CIFAR_FOLDERS[name]}/; it is not the {name} archive")
    if os.path.isdir(folder):
        import shutil

        shutil.rmtree(folder)
    os.replace(inner, folder)
    os.rmdir(tmp)
    read_cifar(folder, name)
    return folder


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise TmlpError(f"cannot read CIFAR batch {path} ({type(err).__name__}); download again") from None


def read_cifar(folder: str, name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)) from an extracted CIFAR folder: x uint8 [N, 32, 32, 3]."""
    if name == "cifar10":
        parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key = "labels"
    else:
        parts, key = {"train": ["train"], "test": ["test"]}, "fine_labels"
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for part in parts[split]:
            batch = _unpickle(os.path.join(folder, part))
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        out.append((np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)))
    return out[0], out[1]
