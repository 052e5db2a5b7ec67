import gzip
import struct

import numpy as np
import pytest
import torch

from difflab.data import fashion_mnist as fm
from difflab.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, read_idx


def write_idx(path, array, code=0x08, compress=True):
    array = np.asarray(array)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_split(root, split="train", n=5, seed=0, compress=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img_name, lbl_name = fm.FILES[split]
    suffix = ".gz" if compress else ""
    write_idx(root / (img_name + suffix), images, compress=compress)
    write_idx(root / (lbl_name + suffix), labels, compress=compress)
    return images, labels


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, compress=False)), a)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    out = read_idx(write_idx(tmp_path / "f.gz", f, code=0x0D))
    assert out.shape == (2, 3) and np.array_equal(out.astype(np.float32), f)


def test_loader_on_synthetic_files(tmp_path):
    images, labels = make_split(tmp_path, "train", n=7)
    x, y = load_fashion_mnist("train", root=tmp_path, check_counts=False)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
    xp, _ = load_fashion_mnist("train", root=tmp_path, check_counts=False, pad_to=32)
    assert xp.shape == (7, 1, 32, 32)
    assert torch.equal(xp[:, :, 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xp[:, 0][:, border] == -1).all()
    # the real split sizes are enforced by default
    with pytest.raises(ValueError, match="expected 60000 train images, found 7"):
        load_fashion_mnist("train", root=tmp_path)


def test_uncompressed_files_and_env_var(tmp_path, monkeypatch):
    make_split(tmp_path, "test", n=3, compress=False)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    x, y = load_fashion_mnist("test", check_counts=False)
    assert x.shape == (3, 1, 28, 28) and y.shape == (3,)


def test_missing_files_name_path_and_package(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_truncated_gzip_names_the_file(tmp_path):
    make_split(tmp_path, "train", n=50)
    p = tmp_path / (fm.FILES["train"][0] + ".gz")
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match=str(p)):
        load_fashion_mnist("train", root=tmp_path, check_counts=False)


def test_corrupt_headers_and_lengths(tmp_path):
    a = np.zeros((4, 28, 28), dtype=np.uint8)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(gzip.decompress(write_idx(short, a).read_bytes())[:-5]))
    with pytest.raises(ValueError, match="short.gz.*truncated or corrupt"):
        read_idx(short)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x01\x08\x03" + b"\x00" * 40))
    with pytest.raises(ValueError, match="bad.gz.*not an idx file"):
        read_idx(bad)
    code = tmp_path / "code.gz"
    code.write_bytes(gzip.compress(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00"))
    with pytest.raises(ValueError, match="code.gz.*bad idx magic"):
        read_idx(code)
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"not really gzip" * 3)
    with pytest.raises(ValueError, match="garbage.gz"):
        read_idx(garbage)


def test_mismatched_images_and_labels(tmp_path):
    make_split(tmp_path, "train", n=4)
    write_idx(tmp_path / (fm.FILES["train"][1] + ".gz"), np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="4 images but .* 5 labels"):
        load_fashion_mnist("train", root=tmp_path, check_counts=False)
    write_idx(tmp_path / (fm.FILES["train"][0] + ".gz"), np.zeros((5, 27, 27), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        load_fashion_mnist("train", root=tmp_path, check_counts=False)


@pytest.mark.needs_fashion_mnist
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test", pad_to=32)
    assert x.shape == (10000, 1, 32, 32) and y.shape == (10000,)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 1000))
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()
    xt, yt = load_fashion_mnist("train")
    assert xt.shape == (60000, 1, 28, 28)
    assert torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 6000))
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == "Ankle boot"
    # class means differ (trousers are narrow, bags are wide): the labels line up with images
    means = torch.stack([x[y == k].mean() for k in range(10)])
    assert means[1] < means[8]
