"""Training: the seeded procedure that runs one Config (`train`), one epoch, the device and kernels it runs on,
and scoring a network on a split (`measure`, `score`).

`train(Config(...))` seeds everything, builds the network and the optimizer with OneCycleLR, trains epoch by
epoch, scores validation after each epoch and the test set once at the end, and returns (model, metrics). It
prints through a `log` callback and writes nothing: the run folder is run_folder.py's job. After each epoch of
a multi-epoch run it hands `on_epoch` everything a resumed run needs (`resume=`), which then ends bit for bit
where the uninterrupted run would have. The settings are recipes.py's; the augmentation, augment.py's.
"""
import contextlib
import functools
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import calibration
import data_file
import uci_digits
from digit_image import TTA_SHIFTS
from errors import UserError
from model import NOT_DIGIT_MODELS, build_model, count_parameters, not_digit_log_probability

# Below this batch size `net`'s ops (4 and 8 channels) are too small to gain from oneDNN convolutions
# or a second thread on CPU: at batch 10 on 2 cores both cost time (benchmark.py); at batch 128 both pay. The
# ResSENet networks, with 16 channels at full resolution, gain from both (and channels-last) at batch 32 too.
SMALL_BATCH = 64
EVAL_BATCH = 1000  # images scored at once, by every recipe (the figures are recorded at this batch)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the message names the step and learning rate."""


class DeviceError(UserError):
    """The device asked for is not on this machine; the message names the ones that are."""
    exit_status = 2


def available_devices():
    """The device types this machine can train on: the CPU, and torch's current accelerator if there is one."""
    found = ["cpu"]
    if torch.accelerator.is_available():
        found.append(torch.accelerator.current_accelerator().type)
    return found


def pick_device(name="auto"):
    """torch.device for a --device: auto is torch's current accelerator, else the CPU."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[-1])
    if name not in available:
        raise DeviceError(f"device {name!r} is not available here (available: {', '.join(available)})")
    return torch.device(name)


def small_ops(config):
    """Whether the config trains `net` at a batch under SMALL_BATCH, on the fast path."""
    return config.kernels != "exact" and config.model == "net" and config.batch_size < SMALL_BATCH


CUBLAS_WORKSPACE = ":4096:8"  # the cuBLAS workspace that makes its matmuls repeatable (CUDA's reproducibility notes)


def cuda_settings(config):
    """What a run on CUDA sets so that the same seed gives the same numbers: deterministic algorithms (warning,
    not failing, where torch has none), cuDNN's deterministic kernels without autotuning, the cuBLAS workspace,
    and TensorFloat-32 off unless config.kernels asks for it (TF32 rounds matmuls and convolutions to 10 bits)."""
    return {"deterministic_algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
            "tf32": config.kernels == "tf32", "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}


@contextlib.contextmanager
def kernels(config, device):
    """For the block, the kernels `config` runs with on `device`; everything is put back as it was after, so
    nothing a run sets outlives it. Entered by train and by whoever scores a network as its training did.

    On the CPU, for small ops (small_ops) plain convolutions on one thread, else oneDNN on the threads the process
    has. On CUDA, cuda_settings(config)."""
    backends = torch.backends
    saved = (backends.mkldnn.enabled, torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), backends.cudnn.deterministic,
             backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if device.type == "cpu":
        small = small_ops(config)
        backends.mkldnn.enabled = not small
        if small:
            torch.set_num_threads(1)
    elif device.type == "cuda":
        chosen = cuda_settings(config)
        torch.use_deterministic_algorithms(chosen["deterministic_algorithms"], warn_only=True)
        backends.cudnn.deterministic = chosen["cudnn_deterministic"]
        backends.cudnn.benchmark = chosen["cudnn_benchmark"]
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = chosen["tf32"]
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = chosen["CUBLAS_WORKSPACE_CONFIG"]
    try:
        yield
    finally:
        backends.mkldnn.enabled = saved[0]
        torch.set_num_threads(saved[1])
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        backends.cudnn.deterministic, backends.cudnn.benchmark = saved[4], saved[5]
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved[6], saved[7]
        if saved[8] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[8]


SGD_MOMENTUM = 0.9  # --optimizer sgd: the <20k reference's own training


def make_optimizer(model, config, total_steps, fused):
    """The config's optimizer and its schedule over `total_steps` batches: (optimizer, scheduler).

    Adam (AdamW when the config has weight decay) under OneCycleLR, or SGD with momentum SGD_MOMENTUM at a
    constant rate (the <20k reference's own training). fused=True uses the single-kernel Adam, which rounds
    differently from torch's default implementation.
    """
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), config.max_lr, momentum=SGD_MOMENTUM,
                                    weight_decay=config.weight_decay)
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    if config.weight_decay:
        optimizer = torch.optim.AdamW(model.parameters(), config.max_lr, weight_decay=config.weight_decay,
                                      fused=fused)
    else:
        optimizer = torch.optim.Adam(model.parameters(), config.max_lr, fused=fused)
    pct_start = config.pct_start
    if pct_start * total_steps == 1:
        # A warm-up of exactly one step has zero width, and OneCycleLR divides by it (e.g. the 8-epoch
        # recipe's dry run: 5 steps x 0.2). Such a warm-up is none at all: anneal from the first step.
        pct_start = 0.0
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, total_steps=total_steps, pct_start=pct_start,
        div_factor=config.div_factor, final_div_factor=config.final_div_factor)
    return optimizer, scheduler


def build_for(config, device, **model_kwargs):
    """The config's network on `device`, in the memory layout its training runs fastest in."""
    return place(build_model(config.model, dropout=config.dropout, **model_kwargs), config, device)


def place(model, config, device):
    """`model` on `device` in the memory layout `config` trains it in (build_for), e.g. a loaded checkpoint."""
    model = model.to(device)
    if config.kernels != "exact" and device.type == "cpu" and not small_ops(config):
        # oneDNN skips a layout reorder around every convolution: ~10% faster at batch 128 on 2 cores.
        model = model.to(memory_format=torch.channels_last)
    return model


def calibrate(model, images, labels, tta):
    """Set a not_digit network's temperature (calibration.choose) from validation digits, and its threshold from
    them and the 13 UCI writers' choose half (uci_digits.prepared); return what was chosen and the validation ECE
    before and after."""
    model.eval()
    model.temperature.fill_(1.0)
    views = torch.stack([torch.cat([log_probabilities(model, x, False, shift) for x in images.split(EVAL_BATCH)]).cpu()
                         for shift in (TTA_SHIFTS if tta else [(0, 0)])])
    chosen = calibration.choose(views, labels.cpu())
    model.temperature.fill_(chosen["temperature"])
    others = torch.from_numpy(uci_digits.prepared())[:, None].to(images.device)
    sure, others = (torch.cat([log_probabilities(model, x, tta).exp().max(1).values.cpu()
                               for x in digits.split(EVAL_BATCH)]) for digits in (images, others))
    # on what the network computes, at its own precision
    chosen.update(threshold_val=calibration.threshold(sure), threshold_others=calibration.threshold(
        others, calibration.KEEP_OTHERS))
    model.threshold.fill_(min(chosen["threshold_val"], chosen["threshold_others"]))
    return {**chosen, "threshold": float(model.threshold)}


def train(config, log=print, data=None, progress=True, on_epoch=None, resume=None, device="auto", dry_run=False):
    """Run one recipe end to end; return (model, metrics). Nothing is written to disk here.

    `data` is what data_file.load_mnist returns, for callers that train many times on the same split (moved to
    the config's device if it is elsewhere). With config.tta, validation and test are scored both single-view and
    with test-time augmentation; with config.ema, they score (and the returned network is) the moving average of
    the weights (moving_average). `on_epoch(state)` is called after every epoch of a multi-epoch run with the
    state to resume from: the weights, optimizer, scheduler, the random generators and the epoch rows so far.
    `resume` is such a state: training goes on after its last epoch, the random draws where they stopped.
    `device`: where to train (auto: torch's current accelerator, else the CPU). `dry_run`: one epoch of five
    batches and one evaluation batch per split, to check the pipeline.
    """
    torch.manual_seed(config.seed)  # before anything random: model init, dropout, data order
    device = pick_device(device)
    with kernels(config, device):
        return run_epochs(config, device, log, data, progress, on_epoch, resume, dry_run)


def run_epochs(config, device, log, data, progress, on_epoch, resume, dry_run):
    """train's body, inside its kernel settings."""
    fast = config.kernels != "exact"
    if data is None:
        data = data_file.load_mnist(config.data_dir, val_size=config.val_size, split_seed=config.seed,
                                    device=device, log=log)
    (x_train, y_train), val, (x_test, y_test) = (split and tuple(t.to(device) for t in split)
                                                 for split in (data["train"], data["val"], data["test"]))
    epochs = config.epochs
    if dry_run:  # one epoch of five batches, and one evaluation batch per split
        epochs = 1
        x_train, y_train = x_train[:5 * config.batch_size], y_train[:5 * config.batch_size]
        x_test, y_test = x_test[:EVAL_BATCH], y_test[:EVAL_BATCH]
        val = val and (val[0][:EVAL_BATCH], val[1][:EVAL_BATCH])

    model = build_for(config, device)
    params = count_parameters(model)
    log(f"model {config.model}: {params:,} parameters | device {device} | seed {config.seed} | "
        f"train {len(y_train):,} val {len(val[1]) if val else 0:,} test {len(y_test):,}")
    steps_per_epoch = data_file.num_batches(len(y_train), config.batch_size)
    optimizer, scheduler = make_optimizer(model, config, epochs * steps_per_epoch, fused=fast)
    generator = torch.Generator().manual_seed(config.seed)  # the training order and augmentation draws
    augmenter = augment.augmentation(config, generator)
    negatives = None
    if config.not_digits:  # a declining reader: images with no digit join every batch
        negatives = augment.negative_batches(config, x_train, y_train, generator, device, log)
    # With config.ema the run is scored and kept as the moving average of its weights (and BatchNorm statistics).
    ema = moving_average(model, config.ema) if config.ema else None
    scored = model if ema is None else ema.module

    val_key = ("val_acc_tta" if config.tta else "val_acc") if val else None  # the figure the epoch table shows
    history = []
    if resume is not None:
        history = restore(resume, model, optimizer, scheduler, generator, device, ema)
        log(f"resumed after epoch {len(history)} of {epochs}")
    log(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'val acc':>8} {'lr':>9} {'seconds':>8}")
    for row in history:  # a resumed run shows the epochs it already has
        log_epoch(row, val_key, log)
    for epoch in range(len(history) + 1, epochs + 1):
        batches = data_file.batches(x_train, y_train, config.batch_size, generator)
        # The last clean_epochs fit the digits as they are (the dry run's one epoch keeps its augmentation).
        clean = epoch > epochs - config.clean_epochs and not dry_run
        row = train_one_epoch(model, optimizer, scheduler, batches, steps_per_epoch, clip_grad=config.clip_grad,
                              augment=None if clean else augmenter, label_smoothing=config.label_smoothing,
                              desc=f"epoch {epoch}", progress=progress, ema=ema,
                              negatives=negatives and functools.partial(negatives, None if clean else augmenter),
                              not_digit_weight=config.not_digits)
        row = {"epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]}
        if val:
            row.update(score(scored, *val, EVAL_BATCH, config.tta, "val_"))
        history.append(row)
        log_epoch(row, val_key, log)
        if on_epoch is not None and epochs > 1:
            on_epoch(resumable_state(model, optimizer, scheduler, generator, device, history, ema))
    chosen = {}
    if config.model in NOT_DIGIT_MODELS:  # its temperature and threshold, on validation, before the test is scored
        chosen = calibrate(scored, *val, config.tta)
        log(f"temperature {chosen['temperature']:.2f} (validation ECE {chosen['val_ece_before']:.2f}% -> "
            f"{chosen['val_ece']:.2f}%) | declines under {100 * chosen['threshold']:.1f}% confidence (validation "
            f"digits {100 * chosen['threshold_val']:.1f}%, UCI's 13 writers {100 * chosen['threshold_others']:.1f}%)")
    test = score(scored, x_test, y_test, EVAL_BATCH, config.tta, "test_", details=True)
    metrics = {
        "recipe": config.recipe, "model": config.model, "parameters": params, "seed": config.seed,
        "device": str(device), "torch": str(torch.__version__),  # a plain str: loadable with weights_only
        "dry_run": dry_run,
        "threads": torch.get_num_threads(), "fast_path": fast, "epochs": history, "kept_epoch": epochs,
        "train_acc": history[-1]["train_acc"], **test, **chosen,
        "train_seconds": sum(r["seconds"] for r in history),
    }
    figures = f"test accuracy {test['test_acc']:.2f}% single-view"
    if config.tta:
        figures += f", {test['test_acc_tta']:.2f}% with TTA"
    log(f"{figures} | running train accuracy {metrics['train_acc']:.2f}% | training "
        f"{metrics['train_seconds']:.1f} s")
    return scored, metrics


def without_timings(metrics):
    """A run's metrics less its seconds (which differ run to run), for bit-for-bit comparisons."""
    metrics = {k: v for k, v in metrics.items() if k != "train_seconds"}
    metrics["epochs"] = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["epochs"]]
    return metrics


def log_epoch(row, val_key, log):
    """One row of the epoch table; val_key None when the run holds out no validation split."""
    val_text = f"{row[val_key]:7.2f}%" if val_key else f"{'-':>8}"
    log(f"{row['epoch']:5d} {row['loss']:10.4f} {row['train_acc']:8.2f}% {val_text} {row['lr']:9.2e} "
        f"{row['seconds']:8.1f}")


def moving_average(model, decay):
    """torch's AveragedModel of `model`: after each update_parameters(model), every weight and BatchNorm
    statistic is `decay` times its average so far plus (1 - decay) times the model's."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def resumable_state(model, optimizer, scheduler, generator, device, history, ema=None):
    """Everything train() needs to go on after the last epoch in `history`, as plain tensors and containers
    (loadable with weights_only=True). Dropout draws from the global generator of the device it runs on: its
    state is kept with the device type, since another device's cannot be put back."""
    rng = torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "rng": rng, "rng_device": device.type, "history": history,
            "ema": None if ema is None else ema.state_dict()}


def restore(state, model, optimizer, scheduler, generator, device, ema=None):
    """Put a resumable_state back; return the epoch rows so far. A state written on another type of device is
    refused (DeviceError) before anything is put back."""
    written_on = state.get("rng_device", "cpu")
    if written_on != device.type:
        raise DeviceError(f"this run trained on {written_on} and goes on only there, bit for bit (it would go on "
                          f"on {device.type}); resume it on a machine with {written_on}")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    if device.type == "cpu":
        torch.set_rng_state(state["rng"])
    else:
        torch.get_device_module(device.type).set_rng_state(state["rng"])
    return list(state["history"])


def score(model, images, labels, batch_size, tta, prefix, details=False):
    """{prefix+"acc", prefix+"loss"} single-view and, with tta, the same with a "_tta" suffix. With details,
    also the confusion matrix and the most confident mistakes, of the prediction the run is scored on
    (the TTA one when tta)."""
    out = {}
    for with_tta in (False, True) if tta else (False,):
        result = measure(model, images, labels, batch_size, details=details and with_tta == tta, tta=with_tta)
        suffix = "_tta" if with_tta else ""
        out.update({prefix + "acc" + suffix: result.pop("acc"), prefix + "loss" + suffix: result.pop("loss")})
        out.update(result)  # confusion and mistakes, once
    return out


def train_one_epoch(model, optimizer, scheduler, batches, steps=None, *, clip_grad=1.0, augment=None,
                    label_smoothing=0.0, desc="train", progress=True, postfix_every=50, ema=None, negatives=None,
                    not_digit_weight=0.0):
    """Train one pass over `batches`, an iterable of (images, labels) of `steps` batches (default:
    len(batches)), e.g. data_file.batches(...) or a DataLoader; augment each batch with `augment(images, labels)`
    (augmentation) if given, step the scheduler after every batch, and update `ema` (a moving_average of the
    model) if given.

    Returns {"loss": mean training loss, "train_acc": running training accuracy in % (measured on each
    batch's digits as they were trained, dropout and augmentation on), "steps", "seconds", "curve": [step, loss,
    train_acc, lr] every `postfix_every` steps, as running means over the epoch so far}. Raises
    NonFiniteLoss at the first step whose loss is NaN or infinite, before that step updates the weights; on an
    accelerator, which is read back only every `postfix_every` steps (each read waits for the device), at the first
    such read after it.

    `negatives()`, for a network with a "not a digit" output: (images, labels) joined to each batch of digits in one
    forward pass (so BatchNorm sees them together, as a reader will meet them): those labelled -1 hold no digit,
    their loss -log P(not a digit) added at `not_digit_weight`; the others are digits like the batch's.
    """
    model.train()
    steps = len(batches) if steps is None else steps
    params = [p for p in model.parameters() if p.requires_grad]  # walked once, not every step
    on_cpu = params[0].device.type == "cpu"
    loss_sum, correct, seen, curve = 0.0, 0, 0, []
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar, 1):
        if augment is not None:
            x = augment(x, y)
        if negatives is not None:
            x_more, y_more = negatives()
            both = model(torch.cat([x, x_more]))
            output, labels, no_digit = both[:len(y)], torch.cat([y, y_more]), y_more < 0
            digits = both[labels >= 0]
            # label smoothing among the digits only: it takes nothing from "not a digit"
            loss = ((1 - label_smoothing) * F.nll_loss(digits, labels[labels >= 0])
                    - label_smoothing * digits.mean(1).mean()
                    - not_digit_weight * not_digit_log_probability(both[len(y):][no_digit]).mean())
        elif label_smoothing:
            output = model(x)
            loss = F.cross_entropy(output, y, label_smoothing=label_smoothing)
        else:
            output = model(x)
            loss = F.nll_loss(output, y)  # the models return log-probabilities
        loss_value = loss.item() if on_cpu else loss.detach()
        if on_cpu and not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss became {loss_value} at step {step} of {steps} "
                                f"(learning rate {scheduler.get_last_lr()[0]:.3g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss_value * len(y)
        correct += (output.argmax(1) == y).sum()  # kept as a tensor, read only every postfix_every steps
        seen += len(y)
        if step % postfix_every == 0 or step == steps:
            loss_sum = float(loss_sum)  # on an accelerator, the one read back of these steps' losses
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"loss became {loss_sum} by step {step} of {steps} "
                                    f"(learning rate {scheduler.get_last_lr()[0]:.3g})")
            point = [step, loss_sum / seen, 100 * int(correct) / seen, scheduler.get_last_lr()[0]]
            curve.append(point)
            bar.set_postfix(loss=f"{point[1]:.4f}", acc=f"{point[2]:.2f}%", lr=f"{point[3]:.2e}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return {"loss": loss_sum / seen, "train_acc": 100 * int(correct) / seen, "steps": steps,
            "seconds": seconds, "curve": curve}



@torch.inference_mode()
def log_probabilities(model, images, tta=False, shift=None):
    """The model's log-probabilities (B, 10) for a batch; with tta, the log of its softmax averaged over
    the image and its four one-pixel shifts (TTA_SHIFTS); with `shift` (dx, dy), of that one view. The caller puts
    the model in eval mode."""
    if not tta and shift is None:
        return model(images)
    h, w = images.shape[-2:]
    # Edge pixels repeat into the gap, as in augment.random_transform; in MNIST they are background.
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    view = lambda dx, dy: model(padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
    if shift is not None:
        return view(*shift)
    probs = sum(view(dx, dy).exp() for dx, dy in TTA_SHIFTS)
    return (probs / len(TTA_SHIFTS)).log()


@torch.inference_mode()
def measure(model, images, labels, batch_size=1000, details=False, tta=False):
    """Loss (mean negative log-likelihood) and accuracy in % over (images, labels), in eval mode, in order;
    with tta, of the prediction averaged over one-pixel shifts (log_probabilities).

    With details=True also "confusion" (10x10 counts, rows true, columns predicted) and "mistakes": the
    16 most confidently wrong [index, true, predicted, confidence], most confident first.
    """
    model.eval()
    output = torch.cat([log_probabilities(model, x, tta) for x, _ in data_file.batches(images, labels, batch_size)])
    pred = output.argmax(1)
    result = {"loss": F.nll_loss(output, labels, reduction="sum").item() / len(labels),
              "acc": 100 * (pred == labels).sum().item() / len(labels)}
    if details:
        result["confusion"] = torch.bincount(labels * 10 + pred, minlength=100).view(10, 10).tolist()
        confidence = output.max(1).values.exp()
        wrong = (pred != labels).nonzero().flatten()
        worst = wrong[confidence[wrong].argsort(descending=True)[:16]]
        result["mistakes"] = [[i, labels[i].item(), pred[i].item(), confidence[i].item()] for i in worst.tolist()]
    return result
