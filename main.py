"""Train a tiny CNN on MNIST and score it once on the held-out test set.

    python main.py                      # the seed-1 recipe: 13,242-parameter Net, one epoch at batch 10
    python main.py --recipe seed1 --seed 2 --save-model
    python main.py --dry-run            # a few steps end to end
    python main.py predict digit.png --checkpoint runs/seed1-seed1/model.pt

A recipe is a named set of defaults; every value in it can be overridden by its flag
(`python main.py --recipe seed1 --help` shows that recipe's values as the defaults).
Each run writes into <out-dir>: metrics.json (config, torch version, device, seed, every figure), the
plots curves.png, confusion.png and mistakes.png, and with --save-model the checkpoint model.pt:
{"model": state_dict, "model_name", "config", "metrics"}.
"""
import argparse
import copy
import functools
import json
import os
import sys
import tempfile

import torch

import data_file
import model_train
from model import MODELS, build_model, count_parameters

RECIPES = {
    # The seed-1 system: Adam + OneCycleLR (flat at 0.005 for the first 10%, then annealed to 0.0005),
    # batch 10, gradient norm clipped to 1.0, one epoch, no validation split.
    "seed1": dict(model="net", epochs=1, batch_size=10, max_lr=0.005, pct_start=0.1, div_factor=1.0,
                  final_div_factor=10.0, weight_decay=0.0, clip_grad=1.0, val_size=0, shift=0.0, rotate=0.0,
                  label_smoothing=0.0, dropout=0.005, tta=False),
    # The seed-2 system: a BatchNorm/SE/residual/GAP network, AdamW + OneCycleLR, shifts and small rotations,
    # label smoothing, 50k/10k train/validation split. Test-time augmentation raised the final validation
    # accuracy of every seed of 1-3 (99.43/99.38/99.30% to 99.48/99.46/99.35%, uncropped, batch 128, max-lr
    # 0.01). Cropping to 22x22 at batch 256 and max-lr 0.02 kept it (99.53/99.49/99.29%) at 0.6x the time
    # per image; 7 epochs instead of 8 lost (99.51/99.33/99.22%), so it trains for 8. Widths 8-16-16 at batch
    # 512 and max-lr 0.03 gave 99.45/99.54/99.33/99.48/99.45% for seeds 1-5, against 99.51/99.37/99.31/99.55/
    # 99.44% for widths 8-16-20 at batch 256 and max-lr 0.02, in less time per image (benchmark.py).
    "seed2": dict(model="ressenet", epochs=8, batch_size=512, max_lr=0.03, pct_start=0.2, div_factor=10.0,
                  final_div_factor=100.0, weight_decay=5e-4, clip_grad=0.0, val_size=10_000, shift=2.0,
                  rotate=10.0, label_smoothing=0.1, dropout=0.1, tta=True),
}
# Below this batch size each op is too small to gain from oneDNN convolutions or a second thread on CPU:
# measured on 2 cores at batch 10, both cost time (benchmark.py); at batch 128 both pay.
SMALL_BATCH = 64
DEFAULT_THREADS = torch.get_num_threads()  # torch's choice for this machine, before anything changes it


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def non_negative_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def non_negative_float(s):
    v = float(s)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def fraction_or_zero(s):
    v = float(s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {s}")
    return v


def build_parser(recipe):
    p = argparse.ArgumentParser(description="Train a tiny CNN on MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="seed1",
                   help="named set of defaults for the flags below")
    p.add_argument("--model", choices=sorted(MODELS), help="network to train")
    p.add_argument("--dropout", type=fraction_or_zero, help="dropout probability of the network")
    p.add_argument("--epochs", type=positive_int, help="number of epochs")
    p.add_argument("--batch-size", type=positive_int, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=1000, help="evaluation batch size")
    p.add_argument("--max-lr", "--lr", dest="max_lr", type=positive_float, help="OneCycleLR peak learning rate")
    p.add_argument("--pct-start", type=fraction, help="OneCycleLR fraction of steps spent warming up")
    p.add_argument("--div-factor", type=positive_float, help="OneCycleLR: initial lr = max-lr / div-factor")
    p.add_argument("--final-div-factor", type=positive_float,
                   help="OneCycleLR: final lr = initial lr / final-div-factor")
    p.add_argument("--weight-decay", type=non_negative_float, help="Adam(W) weight decay")
    p.add_argument("--clip-grad", type=non_negative_float, help="max gradient norm (0: no clipping)")
    p.add_argument("--val-size", type=non_negative_int,
                   help="images carved from the 60k training set for validation (0: none)")
    p.add_argument("--shift", type=non_negative_float, help="augmentation: max random shift in pixels (0: none)")
    p.add_argument("--rotate", type=non_negative_float, help="augmentation: max random rotation in degrees")
    p.add_argument("--label-smoothing", type=fraction_or_zero, help="label smoothing of the training loss")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="score validation and test (and predict) on the softmax averaged over the image and its "
                        "four one-pixel shifts")
    p.add_argument("--keep-best", action="store_true",
                   help="keep the epoch with the best validation accuracy instead of the last one")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--exact", action="store_true",
                   help="torch's default kernels (default Adam, oneDNN) instead of the faster fused Adam")
    p.add_argument("--no-accel", action="store_true", help="train on the CPU even if an accelerator is present")
    p.add_argument("--dry-run", action="store_true",
                   help="one epoch of five batches and small evaluations, to check the pipeline")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (fetched if missing)")
    p.add_argument("--out-dir", help="run folder for metrics.json and model.pt (default: runs/<recipe>-seed<seed>)")
    p.add_argument("--save-model", action="store_true", help="also write the checkpoint model.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(**RECIPES[recipe])
    return p


def parse_args(argv=None):
    # The recipe decides the other defaults, so read it first, then parse everything against it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=sorted(RECIPES), default="seed1")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.recipe)
    args = parser.parse_args(argv)
    if args.val_size >= data_file.TRAIN_SIZE:
        parser.error(f"argument --val-size: must leave training images, got {args.val_size}")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"argument --seed: must fit in 64 bits, got {args.seed}")
    return args


def pick_device(no_accel):
    if not no_accel and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def use_fast_cpu_kernels(fast, batch_size):
    """At small batches on CPU, plain convolutions on one thread; torch's defaults otherwise, or if not fast."""
    small = fast and batch_size < SMALL_BATCH
    torch.backends.mkldnn.enabled = not small
    torch.set_num_threads(1 if small else DEFAULT_THREADS)  # set both ways: runs in one process stay independent


def make_optimizer(model, args, total_steps, fused):
    """Adam (AdamW when the recipe asks for weight decay) and OneCycleLR over `total_steps` batches.

    fused=True uses the single-kernel Adam, which rounds differently from torch's default implementation.
    """
    if args.weight_decay:
        optimizer = torch.optim.AdamW(model.parameters(), args.max_lr, weight_decay=args.weight_decay,
                                      fused=fused)
    else:
        optimizer = torch.optim.Adam(model.parameters(), args.max_lr, fused=fused)
    pct_start = args.pct_start
    if pct_start * total_steps == 1:
        # A warm-up of exactly one step has zero width, and OneCycleLR divides by it (e.g. `--recipe seed2
        # --dry-run`: 5 steps x 0.2). Such a warm-up is none at all: anneal from the first step.
        pct_start = 0.0
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.max_lr, total_steps=total_steps, pct_start=pct_start,
        div_factor=args.div_factor, final_div_factor=args.final_div_factor)
    return optimizer, scheduler


def atomic_write(path, write):
    """Call write(file_object) on a temporary file beside `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def say(*parts):
    """print, flushed: each line shows up at once even when stdout is a pipe (`python main.py | tee log`)."""
    print(*parts, flush=True)


def train(args, log=say, data=None):
    """Run one recipe end to end; return (model, metrics). Nothing is written to disk here.

    `data` is what data_file.load_mnist returns, for callers that train many times on the same split.
    """
    torch.manual_seed(args.seed)  # before anything random: model init, dropout, data order
    device = pick_device(args.no_accel)
    fast = not args.exact
    if device.type == "cpu":
        use_fast_cpu_kernels(fast, args.batch_size)
    if data is None:
        data = data_file.load_mnist(args.data_dir, val_size=args.val_size, split_seed=args.seed,
                                    device=device, log=log)
    (x_train, y_train), val, (x_test, y_test) = data["train"], data["val"], data["test"]
    epochs = args.epochs
    if args.dry_run:  # one epoch of five batches, and one evaluation batch per split
        epochs = 1
        x_train, y_train = x_train[:5 * args.batch_size], y_train[:5 * args.batch_size]
        x_test, y_test = x_test[:args.test_batch_size], y_test[:args.test_batch_size]
        val = val and (val[0][:args.test_batch_size], val[1][:args.test_batch_size])

    model = build_model(args.model, dropout=args.dropout).to(device)
    if fast and device.type == "cpu" and args.batch_size >= SMALL_BATCH:
        # oneDNN skips a layout reorder around every convolution: ~10% faster at batch 128 on 2 cores.
        model = model.to(memory_format=torch.channels_last)
    params = count_parameters(model)
    log(f"model {args.model}: {params:,} parameters | device {device} | seed {args.seed} | "
        f"train {len(y_train):,} val {len(val[1]) if val else 0:,} test {len(y_test):,}")
    steps_per_epoch = data_file.num_batches(len(y_train), args.batch_size)
    optimizer, scheduler = make_optimizer(model, args, epochs * steps_per_epoch, fused=fast)
    generator = torch.Generator().manual_seed(args.seed)  # the training order and augmentation draws
    augment = None
    if args.shift or args.rotate:
        augment = functools.partial(data_file.random_shift_rotate, generator=generator, max_shift=args.shift,
                                    max_degrees=args.rotate)

    history, best = [], None
    log(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'val acc':>8} {'lr':>9} {'seconds':>8}")
    for epoch in range(1, epochs + 1):
        batches = data_file.batches(x_train, y_train, args.batch_size, generator)
        row = model_train.train_one_epoch(model, optimizer, scheduler, batches, steps_per_epoch,
                                          clip_grad=args.clip_grad, augment=augment,
                                          label_smoothing=args.label_smoothing, desc=f"epoch {epoch}",
                                          progress=not args.no_progress)
        row = {"epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]}
        if val:
            row["val_acc"] = model_train.evaluate(model, *val, args.test_batch_size, tta=args.tta)["acc"]
            # Only the validation set may pick the epoch that is kept; the test set never steers anything.
            if args.keep_best and (best is None or row["val_acc"] > best[0]):
                best = (row["val_acc"], epoch, copy.deepcopy(model.state_dict()))
        history.append(row)
        val_text = f"{row['val_acc']:7.2f}%" if val else f"{'-':>8}"
        log(f"{epoch:5d} {row['loss']:10.4f} {row['train_acc']:8.2f}% {val_text} {row['lr']:9.2e} "
            f"{row['seconds']:8.1f}")
    kept_epoch = epochs
    if best is not None:
        kept_epoch = best[1]
        model.load_state_dict(best[2])
    test = model_train.evaluate(model, x_test, y_test, args.test_batch_size, details=True, tta=args.tta)
    metrics = {
        "recipe": args.recipe, "model": args.model, "parameters": params, "seed": args.seed,
        "device": str(device), "torch": str(torch.__version__),  # a plain str: loadable with weights_only
        "threads": torch.get_num_threads(),
        "fast_path": fast, "epochs": history, "kept_epoch": kept_epoch,
        "train_acc": history[kept_epoch - 1]["train_acc"], "test_loss": test["loss"], "test_acc": test["acc"],
        "train_seconds": sum(r["seconds"] for r in history),
        "confusion": test["confusion"], "mistakes": test["mistakes"],
    }
    tta = " with TTA" if args.tta else ""
    log(f"test accuracy {test['acc']:.2f}%{tta} (loss {test['loss']:.4f}) | running train accuracy "
        f"{metrics['train_acc']:.2f}% | kept epoch {kept_epoch} | training {metrics['train_seconds']:.1f} s")
    return model, metrics


def save_run(out_dir, args, model, metrics, log=say):
    # Imported here, once training has let go of the data: matplotlib adds ~50 MB, which at start-up
    # pushed the peak memory of `python main.py` over 1 GB.
    import plots

    os.makedirs(out_dir, exist_ok=True)
    config = vars(args)
    text = json.dumps({"config": config, **metrics}, indent=2).encode()
    atomic_write(os.path.join(out_dir, "metrics.json"), lambda f: f.write(text))
    figures = plots.save_plots(out_dir, metrics, args.data_dir, atomic_write)
    log(f"wrote {os.path.join(out_dir, 'metrics.json')} and {', '.join(figures)}")
    if args.save_model:
        checkpoint = {"model": model.state_dict(), "model_name": args.model, "config": config,
                      "metrics": metrics}
        atomic_write(os.path.join(out_dir, "model.pt"), lambda f: torch.save(checkpoint, f))
        log(f"wrote {os.path.join(out_dir, 'model.pt')}")


class CheckpointError(Exception):
    """A file is not a checkpoint written by this project, or not one for the network asked for."""


def load_checkpoint(path, model_name=None):
    """Load a checkpoint from save_run; return (model in eval mode, checkpoint dict).

    Always weights_only=True: the file is read as tensors and plain values, and no code in it is run.
    With `model_name`, a checkpoint of another network is refused, naming both.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint") from None
    except Exception as e:  # torch.load raises many kinds for a file that is not a plain checkpoint
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) \
            or checkpoint.get("model_name") not in MODELS:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no known model_name and state_dict)")
    name = checkpoint["model_name"]
    if model_name is not None and name != model_name:
        raise CheckpointError(f"{path} holds a {name!r} network, not the {model_name!r} network asked for")
    model = build_model(name)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise CheckpointError(f"{path}: its weights do not fit the {name!r} network it names") from None
    return model.eval(), checkpoint


def predict(argv):
    """`python main.py predict IMAGE... --checkpoint PATH`: the digit and top-3 probabilities per image."""
    p = argparse.ArgumentParser(prog="main.py predict", description="Classify digits in image files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", help="PNG/JPEG files, one digit each, any size, either polarity")
    p.add_argument("--checkpoint", default=os.path.join("runs", "seed1-seed1", "model.pt"),
                   help="a model.pt written by --save-model")
    p.add_argument("--model", choices=sorted(MODELS), help="refuse a checkpoint of any other network")
    args = p.parse_args(argv)
    try:
        model, checkpoint = load_checkpoint(args.checkpoint, args.model)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tta = bool(checkpoint["config"].get("tta")) if isinstance(checkpoint.get("config"), dict) else False
    failed = 0
    for path in args.images:
        try:
            x = data_file.digit_from_image(path)
        except data_file.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = model_train.predict_log_probs(model, x[None], tta).exp()[0]  # scored as training scored it
        top = probs.topk(3)
        ranked = ", ".join(f"{d} {100 * p:.1f}%" for p, d in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {top.indices[0].item()}  ({ranked})")
    return 1 if failed else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    args = parse_args(argv)
    out_dir = args.out_dir or os.path.join("runs", f"{args.recipe}-seed{args.seed}")
    try:
        model, metrics = train(args)
        if not args.dry_run or args.out_dir:  # a dry run writes only where it is told to
            save_run(out_dir, args, model, metrics)
    except (data_file.DataError, model_train.NonFiniteLoss, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
