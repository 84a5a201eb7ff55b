"""Training the row reader (model.RowNet, the `rows-ctc` recipe): rows of handwritten digits composed on the fly
from MNIST's training digits (composed_numbers.training_row), read with CTC, no cut made before reading. A row
reader with a mark class (`rows-nd`, the `rows-nd-ctc` recipe) also learns marks that are no digit (letters in sans
faces, symbols, scribbles: not_digits.ROW_FAMILIES, drawn from the run's seed) set among the digits of some rows,
and typed digits as digits.

`train_rows(config)` is model_train.train for a row network: the same seeding, optimizer and OneCycleLR, kernel
settings, epoch table and bit-for-bit resume. An epoch is as many batches of `batch_size` rows as the training
split has digits / batch_size; the rows of epoch e are drawn from (seed, e), so a resumed run draws what the
uninterrupted run drew. Validation and test are the share of rows read exactly, digit for digit, by the row
reader alone (greedy CTC), on ROWS_SCORED rows composed from the validation and the test digits (fixed seeds).
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import composed_numbers
import data_file
import digit_image
import model_train
from model import ROW_MARK_MODELS, ROW_MODELS, count_parameters

ROWS_SCORED = 1000  # rows composed from the validation (or test) digits to score a row reader on
BUCKET = 8  # batches of rows drawn together and grouped by width, so that a batch pads its rows little
ROW_MARKS = 10_000  # marks that are no digit drawn for a row reader that finds them (not_digits.ROW_FAMILIES) ...
ROW_TYPED = 2_000  # ... and typed digits among the training digits, so that a typed look never marks a non-digit
SCORE_SEEDS = {"val": 7, "test": 8}  # their fixed seeds


def row_batch(rows):
    """Rows [(ink, digits)] as the row reader's batch: (images (B, 1, ROW_HEIGHT, W) normalised, each row padded
    with background to the widest, targets (sum of lengths,) as CTC's classes 1-10, lengths (B,))."""
    inputs = [digit_image.row_input(ink)[0] for ink, _ in rows]
    width = max(r.shape[1] for r in inputs)
    background = -digit_image.MEAN / digit_image.STD
    x = np.full((len(rows), 1, digit_image.ROW_HEIGHT, width), background, np.float32)
    for i, r in enumerate(inputs):
        x[i, 0, :, :r.shape[1]] = r
    targets = torch.tensor([d + 1 for _, digits in rows for d in digits], dtype=torch.long)
    lengths = torch.tensor([len(digits) for _, digits in rows], dtype=torch.long)
    return torch.from_numpy(x), targets, lengths


def ctc_loss(log_probs, targets, lengths):
    """CTC's loss of a batch of frames (B, 11, T), blank 0, every frame of every row read (padding is blank)."""
    frames = log_probs.permute(2, 0, 1)  # (T, B, 11), as F.ctc_loss takes them
    t = torch.full((log_probs.shape[0],), log_probs.shape[2], dtype=torch.long)
    return F.ctc_loss(frames, targets, t, lengths, blank=0, reduction="mean", zero_infinity=True)


def composed_rows(images, labels, count, seed):
    """`count` training rows (composed_numbers.training_row) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return [composed_numbers.training_row(images, labels, rng) for _ in range(count)]


@torch.inference_mode()
def read_rows(model, rows, batch_size=100):
    """What the row reader alone reads in each row: [[digit, ...]] (greedy CTC), the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    read = []
    for i in range(0, len(rows), batch_size):
        x, _, _ = row_batch(rows[i:i + batch_size])
        for frames in model(x.to(device)).cpu().numpy():
            read.append([d for d, _, _ in digit_image.greedy_digits(frames)])
    return read


def score_rows(model, rows):
    """% of rows [(ink, digits)] the row reader alone reads exactly."""
    return 100 * sum(r == digits for r, (_, digits) in zip(read_rows(model, rows), rows)) / len(rows)


def raw_splits(config):
    """The MNIST digits as uint8 numpy (images, labels) for "train", "val" (None without val_size) and "test":
    the same split data_file.load_mnist carves for this config's seed."""
    train, test = (tuple(t.numpy() for t in data_file.read_split(config.data_dir, s)) for s in ("train", "test"))
    val = None
    if config.val_size:
        keep, held = data_file.split_indices(len(train[1]), config.val_size, config.seed)
        train, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    return {"train": train, "val": val, "test": test}


def trainer(config):
    """The function that trains `config`: train_rows for a row network, else model_train.train (same arguments
    but model_train.train's `data`)."""
    return train_rows if config.model in ROW_MODELS else model_train.train


def train_rows(config, log=print, progress=True, on_epoch=None, resume=None, device="auto", dry_run=False):
    """model_train.train for a row network (config.model in model.ROW_MODELS); returns (model, metrics)."""
    torch.manual_seed(config.seed)  # before anything random: model init, dropout
    device = model_train.pick_device(device)
    data_file.ensure_mnist(config.data_dir, log=log)
    with model_train.kernels(config, device):
        return run_row_epochs(config, device, log, progress, on_epoch, resume, dry_run)


def run_row_epochs(config, device, log, progress, on_epoch, resume, dry_run):
    """train_rows' body, inside its kernel settings."""
    splits = raw_splits(config)
    images, labels = splits["train"]
    marks = None
    if config.model in ROW_MARK_MODELS:  # drawn from the run's seed, as a declining digit network's negatives are
        import not_digits
        few = 20 if dry_run else 1  # a dry run draws a twentieth of them: its 5 batches need few
        marks = not_digits.as_uint8(not_digits.training_images(ROW_MARKS // few, config.seed,
                                                               families=not_digits.ROW_FAMILIES))
        typed, typed_labels = not_digits.typed_digits(ROW_TYPED // few, config.seed)
        images = np.concatenate([images, not_digits.as_uint8(typed)])
        labels = np.concatenate([labels, typed_labels.astype(labels.dtype)])
    epochs, steps_per_epoch, scored = config.epochs, data_file.num_batches(len(labels), config.batch_size), ROWS_SCORED
    if dry_run:
        epochs, steps_per_epoch, scored = 1, 5, 20
    val = splits["val"] and composed_rows(*splits["val"], scored, SCORE_SEEDS["val"])
    test = composed_rows(*splits["test"], scored, SCORE_SEEDS["test"])
    model = model_train.build_for(config, device)
    params = count_parameters(model)
    log(f"model {config.model}: {params:,} parameters | device {device} | seed {config.seed} | train digits "
        f"{len(labels):,} | rows scored: val {len(val) if val else 0:,} test {len(test):,}")
    optimizer, scheduler = model_train.make_optimizer(model, config, epochs * steps_per_epoch,
                                                      fused=config.kernels != "exact")
    generator = torch.Generator()  # unused by rows (their draws come from (seed, epoch)); kept for the resume state
    history = []
    if resume is not None:
        history = model_train.restore(resume, model, optimizer, scheduler, generator, device)
        log(f"resumed after epoch {len(history)} of {epochs}")
    val_key = "val_acc" if val else None
    log(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'val acc':>8} {'lr':>9} {'seconds':>8}")
    for row in history:
        model_train.log_epoch(row, val_key, log)
    for epoch in range(len(history) + 1, epochs + 1):
        batches = epoch_batches(images, labels, np.random.default_rng([config.seed, epoch]), config.batch_size,
                                steps_per_epoch, marks, config.not_digits)
        row = train_row_epoch(model, optimizer, scheduler, batches, steps_per_epoch, config.clip_grad,
                              f"epoch {epoch}", progress, device)
        row = {"epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]}
        if val:
            row["val_acc"] = score_rows(model, val)
        history.append(row)
        model_train.log_epoch(row, val_key, log)
        if on_epoch is not None and epochs > 1:
            on_epoch(model_train.resumable_state(model, optimizer, scheduler, generator, device, history))
    test_acc = score_rows(model, test)
    metrics = {
        "recipe": config.recipe, "model": config.model, "parameters": params, "seed": config.seed,
        "device": str(device), "torch": str(torch.__version__), "dry_run": dry_run,
        "threads": torch.get_num_threads(), "fast_path": config.kernels != "exact", "epochs": history,
        "kept_epoch": epochs, "train_acc": history[-1]["train_acc"], "test_acc": test_acc,
        "train_seconds": sum(r["seconds"] for r in history),
    }
    log(f"test rows read exactly {test_acc:.2f}% (row reader alone) | running train rows read exactly "
        f"{metrics['train_acc']:.2f}% | training {metrics['train_seconds']:.1f} s")
    return model, metrics


def epoch_batches(images, labels, rng, batch_size, steps, marks=None, mark_share=0.0):
    """`steps` batches of `batch_size` training rows drawn from rng (with `marks` in `mark_share` of them:
    composed_numbers.training_row), BUCKET batches at a time grouped by width (a batch is padded to its widest
    row: grouped, a step costs about two thirds as much), in an order drawn from rng."""
    for start in range(0, steps, BUCKET):
        count = min(BUCKET, steps - start)
        rows = [composed_numbers.training_row(images, labels, rng, marks, mark_share)
                for _ in range(count * batch_size)]
        rows.sort(key=lambda row: row[0].shape[1] / row[0].shape[0])  # stable: ties keep the order drawn
        for k in rng.permutation(count):
            yield rows[k * batch_size:(k + 1) * batch_size]


def train_row_epoch(model, optimizer, scheduler, batches, steps, clip_grad, desc, progress, device):
    """One pass over `batches` of rows: {"loss", "train_acc" (running share of training rows read exactly, in
    %, dropout on), "steps", "seconds"}."""
    model.train()
    loss_sum, right, seen = 0.0, 0, 0
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, rows in enumerate(bar, 1):
        x, targets, lengths = row_batch(rows)
        log_probs = model(x.to(device))
        loss = ctc_loss(log_probs, targets.to(device), lengths.to(device))
        value = loss.item()
        if not math.isfinite(value):
            raise model_train.NonFiniteLoss(f"loss became {value} at step {step} of {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
        optimizer.step()
        scheduler.step()
        read = [[d for d, _, _ in digit_image.greedy_digits(f)] for f in log_probs.detach().cpu().numpy()]
        right += sum(r == digits for r, (_, digits) in zip(read, rows))
        loss_sum += value * len(rows)
        seen += len(rows)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", exact=f"{100 * right / seen:.1f}%", refresh=False)
    bar.close()
    return {"loss": loss_sum / seen, "train_acc": 100 * right / seen, "steps": steps,
            "seconds": time.perf_counter() - start}
