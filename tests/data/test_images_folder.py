import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import load_dataset
from difflab.data.folder import ImageFolder
from difflab.data.images import grid_size, load_image, load_mask, save_image_grid, to_uint8


def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _halves(h=40, w=60):
    """An RGB image whose left half is red and right half is blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2 :, 2] = 255
    return a


# ------------------------------------------------------------------ grids and conversion


def test_to_uint8_exact_values():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.7, -3.0])
    assert to_uint8(x).tolist() == [0, 64, 128, 255, 255, 0]


@pytest.mark.parametrize("c,n,nrow", [(3, 10, None), (1, 7, 3), (3, 1, None)])
def test_grid_png_has_the_right_size(tmp_path, c, n, nrow):
    x = torch.rand(n, c, 12, 16) * 2 - 1
    path = tmp_path / "sub" / "grid.png"
    save_image_grid(x, path, nrow=nrow)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == ("L" if c == 1 else "RGB")
        assert im.size == grid_size(n, 12, 16, nrow)
        ncol = nrow or int(np.ceil(np.sqrt(n)))
        rows = -(-n // ncol)
        assert im.size == (ncol * 18 + 2, rows * 14 + 2)
        # the first tile is the first image, exactly
        tile = np.asarray(im)[2:14, 2:18]
    first = to_uint8(x[0]).permute(1, 2, 0).numpy()
    assert np.array_equal(tile, first[..., 0] if c == 1 else first)


def test_grid_with_labels(tmp_path):
    x = torch.zeros(4, 3, 32, 32)
    im = save_image_grid(x, tmp_path / "g.png", nrow=2, labels=["a small red circle on the left", "b", "c", "d"])
    w, h = im.size
    assert w == 2 * (64 + 2) + 2  # upscaled x2 to fit the text
    assert h > 2 * (64 + 2) + 2  # a caption row under each image
    assert (np.asarray(im)[66 : h - 2, 2:66] < 128).any()  # some ink in the caption row
    with pytest.raises(ValueError, match="3 labels for 4"):
        save_image_grid(x, tmp_path / "g.png", labels=["a", "b", "c"])


# ------------------------------------------------------------------ single images and masks


def test_load_image_resize_and_centre_crop(tmp_path):
    p = _png(tmp_path / "wide.png", _halves(40, 80))
    x = load_image(p, size=20)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # 40x80 -> 20x40 -> centre crop keeps columns 10..29: left half red, right half blue
    assert (x[0, :, :8] > 0.9).all() and (x[2, :, :8] < -0.9).all()
    assert (x[2, :, 12:] > 0.9).all() and (x[0, :, 12:] < -0.9).all()
    assert load_image(p).shape == (3, 40, 80)
    grey = load_image(p, size=20, channels=1)
    assert grey.shape == (1, 20, 20)


def test_load_image_transparency_over_white(tmp_path):
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[:4, :, :] = (0, 0, 0, 255)  # top opaque black, bottom transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    x = load_image(tmp_path / "t.png")
    assert (x[:, :4] == -1).all() and (x[:, 4:] == 1).all()


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad)
    good = _png(tmp_path / "good.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(cut)


def test_load_mask(tmp_path):
    a = np.zeros((40, 80), dtype=np.uint8)
    a[:, 40:] = 255
    m = load_mask(_png(tmp_path / "m.png", a), 20, strict=True)
    assert m.shape == (1, 20, 20) and set(m.unique().tolist()) == {0.0, 1.0}
    # aligned with load_image's crop of the same geometry: right half (from column 10) is 1
    assert (m[0, :, 11:] == 1).all() and (m[0, :, :9] == 0).all()
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    p = _png(tmp_path / "ramp.png", ramp)
    assert load_mask(p).mean() == pytest.approx(0.5, abs=0.03)  # thresholded at 128
    with pytest.raises(ValueError, match="ramp.png.*not binary"):
        load_mask(p, strict=True)


# ------------------------------------------------------------------ folders


def test_image_folder_with_classes(tmp_path):
    for cls, colour in (("cats", 0), ("dogs", 2)):
        (tmp_path / cls / "deep").mkdir(parents=True)
        for i in range(2):
            a = np.zeros((30, 20, 3), dtype=np.uint8)
            a[..., colour] = 255
            ext = [".png", ".JPG"][i]
            Image.fromarray(a).save(tmp_path / cls / ("deep" if i else "") / f"{i}{ext}")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = ImageFolder(tmp_path, size=16)
    assert ds.images.shape == (4, 3, 16, 16) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert (ds.images[ds.labels == 0][:, 0] > 0.9).all()
    assert (ds.images[ds.labels == 1][:, 2] > 0.9).all()
    data = load_dataset(f"folder:{tmp_path}", size=16, channels=1)
    assert data.channels == 1 and data.class_names == ("cats", "dogs") and len(data) == 4


def test_image_folder_unlabelled_and_formats(tmp_path):
    a = _halves(16, 16)
    for ext in ("png", "jpeg", "bmp", "webp"):
        Image.fromarray(a).save(tmp_path / f"x.{ext}")
    ds = ImageFolder(tmp_path, size=8)
    assert len(ds) == 4 and ds.labels is None and ds[0][1] == -1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope", size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", size=8)
    root = tmp_path / "broken"
    root.mkdir()
    _png(root / "ok.png", _halves())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="broken.jpg"):
        ImageFolder(root, size=8)
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    _png(mixed / "top.png", _halves())
    _png(mixed / "a" / "in.png", _halves())
    with pytest.raises(ValueError, match="both directly"):
        ImageFolder(mixed, size=8)
