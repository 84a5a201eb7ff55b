"""Getting and loading MNIST (data_file.py), the UCI digits (uci_digits.py) and the training augmentation
(augment.py), on the real data.
"""
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import data_file
import recipes
import uci_digits
from conftest import DATA_DIR, quiet




# --- the data -----------------------------------------------------------------------------------------------

def test_mnist_splits_are_normalised_like_torchvision(mnist):
    from torchvision.datasets import MNIST
    for split in ("train", "test"):  # the raw files read as torchvision's MNIST reads them
        theirs = MNIST(DATA_DIR, train=split == "train")
        images, labels = data_file.read_split(DATA_DIR, split)
        assert torch.equal(images, theirs.data) and torch.equal(labels, theirs.targets)
    x, y = mnist["train"]
    assert x.shape == (60_000, 1, 28, 28) and y.shape == (60_000,) and mnist["test"][0].shape[0] == 10_000
    # ToTensor() + Normalize((0.1307,), (0.3081,)): black pixels map to -0.1307/0.3081, white to (1-0.1307)/0.3081
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)
    assert sorted(y.unique().tolist()) == list(range(10))


def test_validation_split_is_carved_from_training_set():
    splits = data_file.load_mnist(DATA_DIR, val_size=10_000, split_seed=3, log=quiet)
    assert len(splits["train"][1]) == 50_000 and len(splits["val"][1]) == 10_000
    again = data_file.load_mnist(DATA_DIR, val_size=10_000, split_seed=3, log=quiet)
    assert torch.equal(splits["val"][0], again["val"][0])  # the same seed, the same split


def test_uci_unseen_writers_are_the_3823_digits_scikit_learn_does_not_ship():
    images, labels = uci_digits.unseen(DATA_DIR, log=quiet)
    assert images.shape == (3823, 8, 8) and images.dtype == torch.uint8 and sorted(set(labels.tolist())) == list(range(10))
    known = {bytes(row) for row in torch.cat([uci_digits.known(h)[0] for h in ("choose", "report")]).reshape(-1, 64).numpy()}
    assert sum(bytes(row) in known for row in images.reshape(-1, 64).numpy()) < 10  # other writers (a few twins by chance)


def test_unseen_writers_that_cannot_be_fetched_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(data_file.DataError) as e:
        uci_digits.ensure_unseen(str(tmp_path), log=quiet)
    assert "\n" not in str(e.value) and str(tmp_path / "UCI" / "optdigits.dat") in str(e.value)
    assert os.listdir(tmp_path / "UCI") == []  # nothing half-written


def copy_raw(tmp_path):
    target = data_file.raw_dir(tmp_path)
    shutil.copytree(data_file.raw_dir(DATA_DIR), target)
    return target


def copy_into(tmp):
    """A fetch source that serves the genuine files: copies them into its temporary folder, as a download would."""
    return shutil.copytree(data_file.raw_dir(DATA_DIR), os.path.join(tmp, "raw"))


def test_corrupted_data_file_is_detected_and_refetched(tmp_path, monkeypatch):
    target = copy_raw(tmp_path)
    path = os.path.join(target, "t10k-labels-idx1-ubyte")
    with open(path, "r+b") as f:  # one label changed: same size, different content
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([(byte[0] + 1) % 10]))
    assert data_file.bad_files(target) == {"t10k-labels-idx1-ubyte": "SHA-256 mismatch (10008 bytes)"}

    monkeypatch.setattr(data_file, "SOURCES", [("a good copy", copy_into)])
    data_file.ensure_mnist(str(tmp_path), log=quiet)
    assert data_file.bad_files(target) == {}


def test_fetch_killed_mid_way_is_never_taken_for_data(tmp_path, monkeypatch):
    target = data_file.raw_dir(tmp_path)
    stale = os.path.join(target, ".fetch-killed")  # what a killed fetch leaves: a temp folder, half a file
    os.makedirs(stale)
    with open(os.path.join(stale, "train-images-idx3-ubyte"), "wb") as f:
        f.write(b"\0" * 1000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert len(data_file.bad_files(target)) == 4  # nothing there counts as data
    monkeypatch.setattr(data_file, "SOURCES", [("a good copy", copy_into)])
    data_file.ensure_mnist(str(tmp_path), log=quiet)
    assert data_file.bad_files(target) == {} and not os.path.exists(stale)


def test_failed_fetch_leaves_nothing_behind_and_says_what_to_do(tmp_path, monkeypatch):
    def broken(tmp):  # writes half a file, then fails, like a download cut off mid-way
        with open(os.path.join(tmp, "train-images-idx3-ubyte"), "wb") as f:
            f.write(b"\0" * 1000)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(data_file, "SOURCES", [("broken mirror", broken)])
    with pytest.raises(data_file.DataError, match="broken mirror: network unreachable.*by hand"):
        data_file.ensure_mnist(str(tmp_path), log=quiet)
    assert os.listdir(data_file.raw_dir(tmp_path)) == []


def test_uci_digits_are_two_fixed_halves_of_all_1797():
    (a, la), (b, lb) = uci_digits.known("choose"), uci_digits.known("report")
    assert len(la) + len(lb) == 1797 and a.shape[1:] == (8, 8) and a.dtype == torch.uint8 and int(a.max()) == 255
    again, _ = uci_digits.known("report")
    assert torch.equal(b, again)  # the same split every time
    png = uci_digits.png(b[0], "dark on light, 64 px, bilinear")
    img = Image.open(__import__("io").BytesIO(png))
    assert img.size == (64, 64) and np.asarray(img)[0, 0] == 255  # dark ink on light paper


# --- augmentation -------------------------------------------------------------------------------------------

def through_affine_grid(x, g, max_shift, max_degrees, max_scale=0.0):
    """(images, zoom): random_transform's draws from `g`, in its order, applied through torch's affine_grid."""
    n = len(x)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift
    angle = (torch.rand(n, generator=g) * 2 - 1) * torch.deg2rad(torch.tensor(max_degrees))
    zoom = 1 + (torch.rand(n, generator=g) * 2 - 1) * max_scale if max_scale else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # rotation divided by the zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] / 14], 1),  # a shift of s pixels is 2s / 28
                         torch.stack([sin, cos, shift[:, 1] / 14], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False), zoom


def test_augmentation_is_affine_grid_and_grid_sample_with_the_generators_draws():
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    same = augment.random_transform(x, torch.Generator().manual_seed(0), max_shift=0.0, max_degrees=0.0)
    torch.testing.assert_close(same, x)  # nothing drawn to move: every pixel samples its own centre
    out = augment.random_transform(x, torch.Generator().manual_seed(5), max_shift=2.0, max_degrees=10.0)
    expected, _ = through_affine_grid(x, torch.Generator().manual_seed(5), 2.0, 10.0)
    # The two grids differ by float rounding (~1e-6 of the half-width), which moves a value by at most ~1e-4.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(out, x, atol=0.1)  # and the images did move


def test_scale_augmentation_grows_and_shrinks_digits_and_draws_only_when_asked_for():
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    out = augment.random_transform(x, g, max_shift=2.0, max_degrees=10.0, max_scale=0.2)
    expected, zoom = through_affine_grid(x, torch.Generator().manual_seed(5), 2.0, 10.0, max_scale=0.2)
    assert 0.8 <= zoom.min() and zoom.max() <= 1.2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    square = torch.zeros(1, 1, 28, 28)
    square[..., 10:18, 10:18] = 1.0
    same = augment.random_transform(square, torch.Generator().manual_seed(0), 0.0, 0.0, max_scale=1e-9)
    assert torch.equal(same, square)  # a vanishing scale moves nothing
    # Without max_scale nothing extra is drawn from the generator, so recipes without it keep their draws.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    augment.random_transform(x, g1, 2.0, 10.0)
    torch.rand(16, 2, generator=g2), torch.rand(16, generator=g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    zoomed = augment.random_transform(square.expand(64, 1, 28, 28), torch.Generator().manual_seed(2), 0.0,
                                           0.0, max_scale=0.5)
    ink = (zoomed > 0.5).sum((1, 2, 3))
    assert ink.min() < 64 < ink.max()  # some shrunk, some grown, from the 8x8 square's 64 pixels



def test_restyle_gives_a_fraction_of_digits_another_writers_look(mnist):
    x = mnist["test"][0][:64]
    assert torch.equal(augment.random_restyle(x, torch.Generator().manual_seed(0), fraction=0.0), x)
    out = augment.random_restyle(x, torch.Generator().manual_seed(3), fraction=0.5)
    again = augment.random_restyle(x, torch.Generator().manual_seed(3), fraction=0.5)
    assert torch.equal(out, again)  # the generator's draws decide everything
    changed = (out - x).abs().amax((1, 2, 3)) > 1e-4
    assert 16 <= changed.sum() <= 48  # about half of the 64
    ink = out * data_file.STD + data_file.MEAN
    torch.testing.assert_close(ink[changed].amax((1, 2, 3)), torch.ones(int(changed.sum())))  # max ink 1
    assert (ink[changed] > 0.5).sum() > (x[changed] * data_file.STD + data_file.MEAN > 0.5).sum()  # thicker ink
    # The recipe's augmentation draws the digit variants first, then restyles, then shifts and rotations, from
    # the one generator.
    y = mnist["test"][1][:64]
    config = recipes.Config(digit_variants=0.5, restyle=0.5, shift=2.0, rotate=10.0)
    composed = augment.augmentation(config, torch.Generator().manual_seed(3))(x, y)
    g = torch.Generator().manual_seed(3)
    expected = augment.random_transform(
        augment.random_restyle(augment.random_digit_variants(x, y, g, 0.5), g, 0.5), g, 2.0, 10.0)
    assert torch.equal(composed, expected)


def test_digit_variants_redraw_only_a_fraction_of_the_1s_and_9s(mnist):
    x, y = mnist["test"][0][:2000], mnist["test"][1][:2000]
    assert torch.equal(augment.random_digit_variants(x, y, torch.Generator().manual_seed(0), 0.0), x)
    out = augment.random_digit_variants(x, y, torch.Generator().manual_seed(4), 0.5)
    assert torch.equal(out, augment.random_digit_variants(x, y, torch.Generator().manual_seed(4), 0.5))
    changed = (out - x).abs().amax((1, 2, 3)) > 1e-4
    eligible = (y == 1) | (y == 9)
    assert not changed[~eligible].any()  # no other digit is touched
    for digit in (1, 9):
        share = changed[y == digit].float().mean()
        assert 0.4 < share < 0.6, (digit, share)  # about half of each
    ink = lambda images: (images * data_file.STD + data_file.MEAN > 0.5).sum((1, 2, 3))
    assert (ink(out[changed]) > ink(x[changed])).all()  # a flag, a foot, a wider bar or a tail: always more ink
    # The same draws whatever the labels: the generator's stream does not depend on how many 1s a batch holds.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment.random_digit_variants(x, y, g1, 0.5), augment.random_digit_variants(x, torch.zeros_like(y), g2, 0.5)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
