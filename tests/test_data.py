"""Data sets: digits, npz files and folders, CIFAR download through a loopback HTTP server, augmentation."""
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from tmlp.data import augment_batch, load_dataset
from tmlp.download import download_dataset
from tmlp.errors import TmlpError
from conftest import shared_data_dir


def test_digits_split_is_fixed_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train.x.shape[1:] == (8, 8, 1) and a.train.x.dtype == np.uint8
    assert len(a.train) + len(a.val) == 1797 and len(a.val) == 359
    assert np.array_equal(a.val.y, b.val.y)


def test_npz_file_gets_a_validation_split(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((50, 6, 6, 3), np.uint8), y=np.arange(50) % 4)
    data = load_dataset(f"npz:{path}")
    assert len(data.train) == 40 and len(data.val) == 10 and data.num_classes == 4 and data.channels == 3


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((5, 6, 6, 3), np.float32), np.zeros(5, int), "x must be uint8"),
    (np.zeros((5, 6, 6), np.uint8), np.zeros(5, int), "x must be uint8 [N, H, W, C]"),
    (np.zeros((5, 6, 6, 3), np.uint8), np.zeros(4, int), "y must be integer labels of shape [5]"),
    (np.zeros((5, 6, 6, 3), np.uint8), -np.ones(5, int), "labels must lie in"),
])
def test_bad_npz_contents(tmp_path, x, y, message):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(TmlpError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(f"npz:{path}")


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(TmlpError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TmlpError, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data is not beside this checkout")
def test_shared_cifar10_jpeg_copy_loads_with_its_own_split():
    data = load_dataset(f"npz:{os.path.join(shared_data_dir(), 'cifar10-jpeg')}")
    assert data.train.x.shape == (45000, 32, 32, 3) and data.val.x.shape == (5000, 32, 32, 3)
    assert data.num_classes == 10 and np.bincount(data.val.y).tolist() == [500] * 10


def test_augmentation_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    for mode in ("crop", "crop_flip"):
        out = augment_batch(x, mode, g)
        assert out.shape == x.shape
    assert torch.equal(augment_batch(x, "none", g), x)
    shifted = augment_batch(x, "crop", torch.Generator().manual_seed(1), pad=2)
    assert ((shifted == 0).float().mean() < 0.25)  # a crop of the padded image, not padding alone


def _cifar_archive(n: int = 6) -> bytes:
    """A CIFAR-10 archive in the real format (pickled batches of 3072-byte rows) with ``n`` images per batch."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 "labels": list(rng.integers(0, 10, n))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture
def http_server():
    """Serve {path: bytes} on 127.0.0.1 (loopback only) for the test's duration."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield files, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cifar10_download_through_loopback_server(tmp_path, http_server):
    files, base = http_server
    archive = _cifar_archive()
    files["/cifar-10-python.tar.gz"] = archive
    md5 = hashlib.md5(archive).hexdigest()
    from click.testing import CliRunner
    from tmlp.cli import main

    result = CliRunner().invoke(main, ["data", "download", "--dataset", "cifar10", "--dir", str(tmp_path),
                                       "--url", f"{base}/cifar-10-python.tar.gz", "--md5", md5])
    assert result.exit_code == 0, result.output
    data = load_dataset("cifar10", root=str(tmp_path))
    assert len(data.train) + len(data.val) == 30 and data.train.x.shape[1:] == (32, 32, 3)
    assert data.num_classes == 10 and data.augment == "crop_flip"


def test_download_with_a_bad_md5_leaves_no_folder(tmp_path, http_server):
    files, base = http_server
    files["/c.tar.gz"] = _cifar_archive()
    with pytest.raises(TmlpError, match="download"):
        download_dataset("cifar10", str(tmp_path), url=f"{base}/c.tar.gz", md5="0" * 32)
    assert not os.path.exists(tmp_path / "cifar-10-batches-py")


def test_download_404_is_a_clear_error(tmp_path, http_server):
    _, base = http_server
    with pytest.raises(TmlpError, match="cannot download cifar10"):
        download_dataset("cifar10", str(tmp_path), url=f"{base}/missing.tar.gz")


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(TmlpError, match="tmlp data download --dataset cifar10"):
        load_dataset("cifar10", root=str(tmp_path))


def test_imagefolder_layout_is_read_and_centre_cropped(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", image_size=24)
    assert len(data.train) == 6 and len(data.val) == 4 and data.num_classes == 2
    images = data.train.images(np.arange(6))
    assert images.shape == (6, 24, 24, 3) and images.dtype == np.uint8
    assert data.preprocessing((24, 24))["mean"] == list(data.mean)


def test_imagefolder_without_val_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(TmlpError, match="needs .*val"):
        load_dataset(f"imagefolder:{tmp_path}")
