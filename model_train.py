"""Training: the recipes, the seeded procedure that runs one (`train`), one epoch, and evaluation.

`train(Config(...))` seeds everything, builds the network and the optimizer with OneCycleLR, trains epoch by
epoch, scores validation after each epoch and the test set once at the end, and returns (model, metrics). It
prints through a `log` callback and writes nothing: the run folder is run_folder.py's job. After each epoch of
a multi-epoch run it hands `on_epoch` everything a resumed run needs (`resume=`), which then ends bit for bit
where the uninterrupted run would have. `rescore` scores a trained network again, as training scored it.
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_file
import digit_image
from model import MODELS, build_model, count_parameters

DEVICES = ("auto", "cpu", "cuda", "mps", "xpu")


def flag_type(kind, check):
    """An argparse type: `kind` parsed, and refused with "must be <what>" unless CHECKS[check] passes it."""
    test, what = CHECKS[check]

    def parse(s):
        v = kind(s)
        if not test(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" messages
    return parse


# The validators of command-line values (a Config field names its own: setting(check=...)): (test, what it must be).
CHECKS = {
    "positive": (lambda v: 0 < v < math.inf, "a positive number"),
    "non_negative": (lambda v: 0 <= v < math.inf, "0 or a positive number"),
    "fraction": (lambda v: 0 < v < 1, "between 0 and 1"),
    "fraction_or_zero": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "val_size": (lambda v: 0 <= v < data_file.TRAIN_SIZE,
                 f"0 or more, leaving training images (below {data_file.TRAIN_SIZE:,})"),
    "seed": (lambda v: -2**63 <= v < 2**64, "an integer that fits in 64 bits"),
    "not_empty": (bool, "a name, not empty"),
}


def setting(default, help, check=None, choices=None, flags=None, cli=True):
    """A Config field declared once: its default, its --help text, and how the command line reads it.

    check names a validator in CHECKS; flags are the field's spellings (default: --field-name; a bool is --x and
    --no-x); cli=False: the command line writes its own flag for it."""
    return dataclasses.field(default=default, metadata=dict(help=help, check=check, choices=choices, flags=flags,
                                                            cli=cli))


@dataclasses.dataclass
class Config:
    """Every value one training run depends on; a recipe is a named set of them (RECIPES). Each field is also
    the command-line flag of the same name (main.py builds the parser from these fields)."""
    recipe: str = setting("net-1epoch", "the recipe these values started from", cli=False)
    model: str = setting("net", "network to train", choices=tuple(sorted(MODELS)))
    dropout: float = setting(0.005, "dropout probability of the network", "fraction_or_zero")
    epochs: int = setting(1, "number of epochs", "positive")
    batch_size: int = setting(10, "training batch size", "positive")
    test_batch_size: int = setting(1000, "evaluation batch size", "positive")
    optimizer: str = setting("adam", "adam (AdamW with --weight-decay) or sgd", choices=("adam", "sgd"))
    momentum: float = setting(0.9, "SGD momentum", "non_negative")
    schedule: str = setting("onecycle", "learning-rate schedule", choices=("onecycle", "constant"))
    max_lr: float = setting(0.005, "OneCycleLR peak learning rate (the rate itself with --schedule constant)",
                            "positive", flags=("--max-lr", "--lr"))
    pct_start: float = setting(0.1, "OneCycleLR fraction of steps spent warming up", "fraction")
    div_factor: float = setting(1.0, "OneCycleLR: initial lr = max-lr / div-factor", "positive")
    final_div_factor: float = setting(10.0, "OneCycleLR: final lr = initial lr / final-div-factor", "positive")
    weight_decay: float = setting(0.0, "weight decay", "non_negative")
    clip_grad: float = setting(1.0, "max gradient norm (0: no clipping)", "non_negative")
    val_size: int = setting(0, "images carved from the 60k training set for validation (0: none)", "val_size")
    shift: float = setting(0.0, "augmentation: max random shift in pixels (0: none)", "non_negative")
    rotate: float = setting(0.0, "augmentation: max random rotation in degrees", "non_negative")
    scale: float = setting(0.0, "augmentation: max relative change of size (0.1: each digit 90% to 110% of its "
                                "size)", "fraction_or_zero")
    elastic: float = setting(0.0, "augmentation: bend each digit's strokes by a smooth random displacement of "
                                  "about this many pixels (0: none)", "non_negative")
    restyle: float = setting(0.0, "augmentation: fraction of training digits given another writer's look "
                                  "(thicker, coarse or blurred strokes)", "fraction_or_zero")
    digit_variants: float = setting(0.0, "augmentation: fraction of the 1s and 9s drawn as other writers draw "
                                         "them (flagged or block 1s, 9s with a curled tail)", "fraction_or_zero")
    hooked_nines: bool = setting(False, "with --digit-variants: the 9's tail a longer hook, 15 degrees below the "
                                        "horizontal to 30 above, instead of curled 10-45 degrees up")
    looks: float = setting(0.0, "augmentation: fraction of training digits drawn in a look other writers have and "
                                "MNIST's lacks (marker strokes, a filled box, continental 1s, open 4s, barred 7s, "
                                "9s with a straight stem)", "fraction_or_zero")
    clean_epochs: int = setting(0, "train the last N epochs on the digits as they are, without the augmentation "
                                   "above", "non_negative")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss", "fraction_or_zero")
    ema: float = setting(0.0, "score and keep a moving average of the weights, with this decay per step "
                              "(0: the weights)", "fraction_or_zero")
    tta: bool = setting(False, "also score validation and test (and predict) on the softmax averaged over the "
                               "image and its four one-pixel shifts")
    keep_best: bool = setting(False, "keep the epoch with the best validation accuracy instead of the last one")
    seed: int = setting(1, "random seed", "seed")
    exact: bool = setting(False, "torch's default kernels (default Adam, oneDNN) instead of the faster fused Adam")
    device: str = setting("auto", "where to train: auto is torch's current accelerator, else the CPU",
                          choices=DEVICES)
    dry_run: bool = setting(False, "one epoch of five batches and one evaluation batch per split", cli=False)
    data_dir: str = setting("./data", "where MNIST is kept (fetched if missing)")


# Recipes by purpose. Each is a named base below plus a few overrides, never another recipe, so changing one
# recipe changes no other; test_model.py pins every recipe's values. Values not given are Config's defaults.
# What each reaches is in README.md; how each was chosen, and the flags of the recipes it beat, in
# docs/experiments.md.
#
# The seed-2 kind of training: AdamW + OneCycleLR at batch 512, shifts and small rotations, label smoothing,
# dropout, a 50k/10k train/validation split, scored with test-time augmentation.
RESSENET = dict(model="ressenet", epochs=8, batch_size=512, max_lr=0.03, pct_start=0.2, div_factor=10.0,
                final_div_factor=100.0, weight_decay=5e-4, clip_grad=0.0, val_size=10_000, shift=2.0, rotate=10.0,
                label_smoothing=0.1, dropout=0.1, tta=True)
# One pass over all 60,000 images: label smoothing, no augmentation (it slows early learning), single-view.
ONE_PASS = dict(epochs=1, pct_start=0.2, div_factor=10.0, final_div_factor=100.0, weight_decay=5e-4, clip_grad=0.0,
                label_smoothing=0.1)
# Networks of a few thousand parameters or fewer: 40 epochs on all 60,000 images at batch 128, light augmentation
# (more cost them accuracy), the last 4 epochs on the digits as they are, kept as the weights' moving average.
SMALL_NETWORK = dict(epochs=40, batch_size=128, max_lr=0.02, pct_start=0.2, div_factor=10.0, final_div_factor=100.0,
                     clip_grad=0.0, dropout=0.0, shift=1.0, rotate=5.0, ema=0.999, clean_epochs=4, tta=True)

RECIPES = {
    # The seed-1 system: the 13,242-parameter CNN, Adam + OneCycleLR (flat at 0.005 for the first 10%, then
    # annealed to 0.0005), batch 10, gradient norm clipped to 1.0, one epoch on all 60,000 images.
    "net-1epoch": dict(),
    # The seed-2 system: >= 99.4% on the test set in 8 epochs with BatchNorm, attention, residuals and GAP.
    "ressenet-8epoch": dict(RESSENET),
    # Seed 2's own training on our network: SGD at a constant 0.05 with momentum 0.9, batch 128, 19 epochs,
    # nothing else (no augmentation, label smoothing, weight decay or clipping).
    "ressenet-sgd-19epoch": dict(model="ressenet", dropout=0.1, epochs=19, batch_size=128, optimizer="sgd",
                                 momentum=0.9, schedule="constant", max_lr=0.05, clip_grad=0.0, val_size=10_000),
    # The most accurate single epoch: a wider ressenet on the central 24x24 at batch 24 (more steps).
    "ressenet-wide-1epoch": dict(ONE_PASS, model="ressenet-wide", batch_size=24, max_lr=0.0075, dropout=0.1),
    # The fastest to 99% in one epoch (benchmark.py --suite race): the central 22x22 at batch 128.
    "ressenet-wide22-b128-1epoch": dict(ONE_PASS, model="ressenet-wide22", batch_size=128, max_lr=0.03, dropout=0.0),
    # The most accurate under 20k parameters: 30 epochs, digits also scaled by up to 10%, all 60,000 images,
    # scored and kept as the moving average of the weights.
    "ressenet-wide-ema-30epoch": dict(RESSENET, model="ressenet-wide", epochs=30, batch_size=256, max_lr=0.02,
                                      scale=0.1, val_size=0, ema=0.999),
    # Reads other people's handwriting best (predict, serve): the same with a quarter of each batch given another
    # writer's look and half of the 1s and 9s drawn as other writers draw them (the 9s with a hooked tail), the
    # last two epochs on the digits as they are.
    "ressenet-wide-writers-clean-30epoch": dict(RESSENET, model="ressenet-wide", epochs=30, batch_size=256,
                                                max_lr=0.02, scale=0.1, val_size=0, ema=0.999, restyle=0.25,
                                                digit_variants=0.5, hooked_nines=True, clean_epochs=2),
    # The most accurate at <= 3,500 parameters.
    "ressenet-micro-clean-40epoch": dict(SMALL_NETWORK, model="ressenet-micro"),
    # The most accurate at <= 1,000 parameters.
    "shared-nano-clean-40epoch": dict(SMALL_NETWORK, model="shared-nano"),
}
# The names these recipes had before; still accepted.
ALIASES = {"seed1": "net-1epoch", "seed2": "ressenet-8epoch"}
# Recipes that left the list (each beaten, or a step on the way to a kept one): the kept recipe and the flags that
# make the same run, bit for bit. `--recipe NAME` says so; `report` still tabulates their run folders.
RETIRED = {
    "ressenet-12epoch": ("ressenet-8epoch", dict(epochs=12, val_size=0)),
    "ressenet-restyle-12epoch": ("ressenet-8epoch", dict(epochs=12, val_size=0, restyle=0.5)),
    "ressenet-wide-b128-1epoch": ("ressenet-wide22-b128-1epoch", dict(model="ressenet-wide")),
    "ressenet-wide-30epoch": ("ressenet-wide-ema-30epoch", dict(ema=0.0)),
    "ressenet-small-15epoch": ("ressenet-8epoch", dict(model="ressenet-small", epochs=15, batch_size=128,
                                                       max_lr=0.01)),
    "ressenet-tiny-15epoch": ("ressenet-8epoch", dict(model="ressenet-tiny", epochs=15, batch_size=128,
                                                      max_lr=0.01)),
    "ressenet-micro-40epoch": ("ressenet-micro-clean-40epoch", dict(clean_epochs=0)),
    "ressenet-micro-50epoch": ("ressenet-micro-clean-40epoch", dict(clean_epochs=0, epochs=50)),
    "ressenet-micro-lr03-40epoch": ("ressenet-micro-clean-40epoch", dict(clean_epochs=0, max_lr=0.03)),
    "ressenet-micro-elastic-40epoch": ("ressenet-micro-clean-40epoch", dict(elastic=0.75)),
    "ressenet-wide-variants-30epoch": ("ressenet-wide-writers-clean-30epoch", dict(restyle=0.5, hooked_nines=False,
                                                                                  clean_epochs=0)),
    "ressenet-wide-writers-30epoch": ("ressenet-wide-writers-clean-30epoch", dict(clean_epochs=0)),
}

# Below this batch size the seed-1 `net`'s ops (4 and 8 channels) are too small to gain from oneDNN convolutions
# or a second thread on CPU: at batch 10 on 2 cores both cost time (benchmark.py); at batch 128 both pay. The
# ResSENet networks, with 16 channels at full resolution, gain from both (and channels-last) at batch 32 too.
SMALL_BATCH = 64
DEFAULT_THREADS = torch.get_num_threads()  # torch's choice for this machine, before anything changes it


def recipe_config(name, **overrides):
    """The Config of a recipe (or an alias of one), with `overrides` on top."""
    name = ALIASES.get(name, name)
    return Config(**{"recipe": name, **RECIPES[name], **overrides})


def as_flags(changes):
    """The command-line flags that set `changes` ({Config field: value}), e.g. ["--epochs 12", "--no-tta"]."""
    flags = []
    for name, value in changes.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag} {value}")
    return flags


def retired_config(name):
    """The Config a retired recipe (RETIRED) ran, under its own name: how `report` reads its old run folders."""
    recipe, overrides = RETIRED[name]
    return recipe_config(recipe, **overrides, recipe=name)


def config_from_dict(stored):
    """The Config stored in a run folder or checkpoint (dataclasses.asdict of one); keys it does not know are
    ignored, so a checkpoint written before a setting existed loads with that setting's default."""
    return Config(**{f.name: stored[f.name] for f in dataclasses.fields(Config) if f.name in stored})


# --- a Config on the command line: each field's flag comes from its setting(); main.py adds the run's own flags.

def recipe_flag(name):
    """--recipe's type: a retired recipe is refused with the recipe and flags that make the same run."""
    if name in RETIRED:
        recipe, changes = RETIRED[name]
        raise argparse.ArgumentTypeError(f"{name} has left the recipe list; the same run is `--recipe {recipe} "
                                         f"{' '.join(as_flags(changes))}` (docs/experiments.md)")
    return name


RECIPE_NAMES = sorted(RECIPES) + sorted(ALIASES)


def add_config_flags(p, recipe="net-1epoch", defaults=True):
    """--recipe and one flag per Config field that has one, typed, checked and described as the field says, with
    `recipe`'s values as defaults; defaults=False leaves out every flag not given (to see which are)."""
    p.add_argument("--recipe", type=recipe_flag, choices=RECIPE_NAMES,
                   default="net-1epoch" if defaults else argparse.SUPPRESS,
                   help="named set of defaults for the flags below (seed1, seed2: old names of net-1epoch, "
                        "ressenet-8epoch)")
    for field in dataclasses.fields(Config):
        meta = field.metadata
        if not meta["cli"]:
            continue
        kwargs = dict(dest=field.name, help=meta["help"].replace("%", "%%"))
        if field.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=flag_type(field.type, meta["check"]) if meta["check"] else field.type,
                          choices=meta["choices"])
        p.add_argument(*(meta["flags"] or ["--" + field.name.replace("_", "-")]), **kwargs)
    if defaults:
        p.set_defaults(**dataclasses.asdict(recipe_config(recipe)))


def recipe_in(argv):
    """The recipe a command line names (default net-1epoch; one it cannot name is left to the full parser to
    refuse): it decides the other flags' defaults, so it is read first."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--recipe", type=recipe_flag, choices=RECIPE_NAMES, default="net-1epoch")
    try:
        return pre.parse_known_args(argv)[0].recipe
    except argparse.ArgumentError:
        return "net-1epoch"


def config_from_args(args):
    """The training config: the parsed flags (add_config_flags') that Config has."""
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the message names the step and learning rate."""


class DeviceError(Exception):
    """The device asked for is not on this machine; the message names the ones that are."""


def available_devices():
    """The device types this machine can train on: the CPU, and torch's current accelerator if there is one."""
    found = ["cpu"]
    if torch.accelerator.is_available():
        found.append(torch.accelerator.current_accelerator().type)
    return found


def pick_device(name="auto"):
    """torch.device for a Config.device: auto is torch's current accelerator, else the CPU."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[-1])
    if name not in available:
        raise DeviceError(f"device {name!r} is not available here (available: {', '.join(available)})")
    return torch.device(name)


def small_ops(config):
    """Whether the config trains `net` at a batch under SMALL_BATCH, on the fast path."""
    return not config.exact and config.model == "net" and config.batch_size < SMALL_BATCH


def use_fast_cpu_kernels(config):
    """For small ops (small_ops), plain convolutions on one thread; torch's defaults otherwise."""
    small = small_ops(config)
    torch.backends.mkldnn.enabled = not small
    torch.set_num_threads(1 if small else DEFAULT_THREADS)  # set both ways: runs in one process stay independent


def make_optimizer(model, config, total_steps, fused):
    """The config's optimizer and its schedule over `total_steps` batches: (optimizer, scheduler).

    Adam (AdamW when the config has weight decay) or SGD with momentum; OneCycleLR, or a constant rate.
    fused=True uses the single-kernel Adam, which rounds differently from torch's default implementation.
    """
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), config.max_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    elif config.weight_decay:
        optimizer = torch.optim.AdamW(model.parameters(), config.max_lr, weight_decay=config.weight_decay,
                                      fused=fused)
    else:
        optimizer = torch.optim.Adam(model.parameters(), config.max_lr, fused=fused)
    if config.schedule == "constant":
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
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
    if not config.exact and device.type == "cpu" and not small_ops(config):
        # oneDNN skips a layout reorder around every convolution: ~10% faster at batch 128 on 2 cores.
        model = model.to(memory_format=torch.channels_last)
    return model


def setup_device(config):
    """The config's device, with the CPU kernel choice its training makes (use_fast_cpu_kernels)."""
    device = pick_device(config.device)
    if device.type == "cpu":
        use_fast_cpu_kernels(config)
    return device


def augmentation(config, generator):
    """The config's training augmentation `augment(images, labels)` drawing from `generator`, or None: the 1s
    and 9s as other writers draw them (config.digit_variants), the looks other writers have (config.looks),
    another writer's look (config.restyle), then shifts, rotations, scaling and elastic bending."""
    steps = []
    if config.digit_variants:
        steps.append(lambda x, y: data_file.random_digit_variants(x, y, generator, config.digit_variants,
                                                                   config.hooked_nines))
    if config.looks:
        steps.append(lambda x, y: data_file.random_looks(x, y, generator, config.looks))
    if config.restyle:
        steps.append(lambda x, y: data_file.random_restyle(x, generator, config.restyle))
    if config.shift or config.rotate or config.scale or config.elastic:
        steps.append(lambda x, y: data_file.random_transform(x, generator, max_shift=config.shift,
                                                                max_degrees=config.rotate, max_scale=config.scale,
                                                                elastic=config.elastic))
    if not steps:
        return None

    def augment(images, labels):
        for step in steps:
            images = step(images, labels)
        return images
    return augment


def train(config, log=print, data=None, progress=True, on_epoch=None, resume=None):
    """Run one recipe end to end; return (model, metrics). Nothing is written to disk here.

    `data` is what data_file.load_mnist returns, for callers that train many times on the same split.
    With config.tta, validation and test are scored both single-view and with test-time augmentation; with
    config.ema, they score (and the returned network is) the moving average of the weights (moving_average).
    `on_epoch(state)` is called after every epoch of a multi-epoch run with the state to resume from: the
    weights, optimizer, scheduler, both random generators, the epoch rows so far and the kept best epoch.
    `resume` is such a state: training goes on after its last epoch, the random draws where they stopped.
    """
    torch.manual_seed(config.seed)  # before anything random: model init, dropout, data order
    device = setup_device(config)
    fast = not config.exact
    if data is None:
        data = data_file.load_mnist(config.data_dir, val_size=config.val_size, split_seed=config.seed,
                                    device=device, log=log)
    (x_train, y_train), val, (x_test, y_test) = data["train"], data["val"], data["test"]
    epochs, eval_batch = config.epochs, config.test_batch_size
    if config.dry_run:  # one epoch of five batches, and one evaluation batch per split
        epochs = 1
        x_train, y_train = x_train[:5 * config.batch_size], y_train[:5 * config.batch_size]
        x_test, y_test = x_test[:eval_batch], y_test[:eval_batch]
        val = val and (val[0][:eval_batch], val[1][:eval_batch])

    model = build_for(config, device)
    params = count_parameters(model)
    log(f"model {config.model}: {params:,} parameters | device {device} | seed {config.seed} | "
        f"train {len(y_train):,} val {len(val[1]) if val else 0:,} test {len(y_test):,}")
    steps_per_epoch = data_file.num_batches(len(y_train), config.batch_size)
    optimizer, scheduler = make_optimizer(model, config, epochs * steps_per_epoch, fused=fast)
    generator = torch.Generator().manual_seed(config.seed)  # the training order and augmentation draws
    augment = augmentation(config, generator)
    # With config.ema the run is scored and kept as the moving average of its weights (and BatchNorm statistics).
    ema = moving_average(model, config.ema) if config.ema else None
    scored = model if ema is None else ema.module

    # The validation figure that picks the kept epoch: with TTA, the TTA one, since that is how the run is scored.
    val_key = "val_acc_tta" if config.tta else "val_acc"
    history, best = [], None  # best: {"val", "epoch", "model"} of the epoch keep_best keeps
    if resume is not None:
        history, best = restore(resume, model, optimizer, scheduler, generator, device, ema)
        log(f"resumed after epoch {len(history)} of {epochs}")
    log(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'val acc':>8} {'lr':>9} {'seconds':>8}")
    for row in history:  # a resumed run shows the epochs it already has
        log_epoch(row, val_key if val else None, log)
    for epoch in range(len(history) + 1, epochs + 1):
        batches = data_file.batches(x_train, y_train, config.batch_size, generator)
        # The last clean_epochs fit the digits as they are (the dry run's one epoch keeps its augmentation).
        clean = epoch > epochs - config.clean_epochs and not config.dry_run
        row = train_one_epoch(model, optimizer, scheduler, batches, steps_per_epoch, clip_grad=config.clip_grad,
                              augment=None if clean else augment, label_smoothing=config.label_smoothing,
                              desc=f"epoch {epoch}", progress=progress, ema=ema)
        row = {"epoch": epoch, **row, "lr": scheduler.get_last_lr()[0]}
        if val:
            row.update(score(scored, *val, eval_batch, config.tta, "val_"))
            # Only the validation set may pick the epoch that is kept; the test set never steers anything.
            if config.keep_best and (best is None or row[val_key] > best["val"]):
                best = {"val": row[val_key], "epoch": epoch, "model": copy.deepcopy(scored.state_dict())}
        history.append(row)
        log_epoch(row, val_key if val else None, log)
        if on_epoch is not None and epochs > 1:
            on_epoch(resumable_state(model, optimizer, scheduler, generator, device, history, best, ema))
    model, kept_epoch = scored, epochs
    if best is not None:
        kept_epoch = best["epoch"]
        model.load_state_dict(best["model"])
    test = score(model, x_test, y_test, eval_batch, config.tta, "test_", details=True)
    metrics = {
        "recipe": config.recipe, "model": config.model, "parameters": params, "seed": config.seed,
        "device": str(device), "torch": str(torch.__version__),  # a plain str: loadable with weights_only
        "threads": torch.get_num_threads(), "fast_path": fast, "epochs": history, "kept_epoch": kept_epoch,
        "train_acc": history[kept_epoch - 1]["train_acc"], **test,
        "train_seconds": sum(r["seconds"] for r in history),
    }
    figures = f"test accuracy {test['test_acc']:.2f}% single-view"
    if config.tta:
        figures += f", {test['test_acc_tta']:.2f}% with TTA"
    log(f"{figures} | running train accuracy {metrics['train_acc']:.2f}% | kept epoch {kept_epoch} | "
        f"training {metrics['train_seconds']:.1f} s")
    return model, metrics


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


def resumable_state(model, optimizer, scheduler, generator, device, history, best, ema=None):
    """Everything train() needs to go on after the last epoch in `history`, as plain tensors and containers
    (loadable with weights_only=True). The global generator draws dropout (on the device, off the CPU)."""
    rng = torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "rng": rng, "history": history, "best": best,
            "ema": None if ema is None else ema.state_dict()}


def restore(state, model, optimizer, scheduler, generator, device, ema=None):
    """Put a resumable_state back; return (history, best)."""
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
    return list(state["history"]), state["best"]


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


class NoValidationSplit(Exception):
    """A run that held out no validation split was asked to score one."""


def rescore(model, config, split="test", log=print):
    """Score a trained network again, as its run scored it: the test set or the validation split the run held
    out (rebuilt from config.seed and config.val_size), with the kernels and memory layout training used,
    single-view and, when config.tta, with TTA. Returns score()'s figures without a prefix ("acc", "loss",
    "acc_tta", ...), the confusion matrix of the prediction the run is scored on, and "images"."""
    if split == "val" and not config.val_size:
        raise NoValidationSplit("this run held out no validation split (its val_size is 0); score --split test")
    device = setup_device(config)
    data = data_file.load_mnist(config.data_dir, val_size=config.val_size, split_seed=config.seed, device=device,
                                log=log)
    images, labels = data[split]
    model = place(model, config, device)
    return {**score(model, images, labels, config.test_batch_size, config.tta, "", details=True),
            "images": len(labels)}


def evaluation_lines(model, config, split, recorded, log=print):
    """What `python main.py evaluate` prints of rescore: accuracy and loss (single-view, and with TTA when
    the run used it), per-class accuracy and, for the test set, what the run recorded in `recorded` (metrics)."""
    result = rescore(model, config, split, log=log)
    name = {"test": "test set", "val": "validation split"}[split]
    views = ["", "_tta"] if config.tta else [""]
    lines = [f"{name}, {result['images']:,} images: " + ", ".join(
        f"accuracy {result['acc' + v]:.2f}% loss {result['loss' + v]:.4f} {'with TTA' if v else 'single-view'}"
        for v in views)]
    per_class = per_class_accuracy(result["confusion"])
    lines.append(f"per-class accuracy{' with TTA' if config.tta else ''}: " +
                 "  ".join(f"{d} {a:.2f}%" for d, a in enumerate(per_class)))
    if split == "test" and "test_acc" in recorded:
        lines.append("the run recorded: " + ", ".join(f"{recorded['test_acc' + v]:.2f}% "
                                                      f"{'with TTA' if v else 'single-view'}"
                                                      for v in views if "test_acc" + v in recorded))
    return lines


@contextlib.contextmanager
def predict_path(model):
    """The model as `predict` runs it: on the CPU, in the layout a loaded checkpoint has, in eval mode, with
    torch's default kernels and threads (put back after), so a figure scored inside is what predict says."""
    kernels, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = True
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        yield model.cpu().to(memory_format=torch.contiguous_format).eval()
    finally:
        torch.backends.mkldnn.enabled = kernels
        torch.set_num_threads(threads)


def score_uci_digits(model, tta, half="report", count=None, data_dir="./data"):
    """Accuracy in % on the UCI digits in each of data_file.UCI_FORMS, through predict's own path: each digit's
    PNG file, data_file.digit_from_image, then digit_probabilities one image at a time (TTA when the run used
    it), so each figure is what `python main.py predict` says of those files. Returns {form: accuracy}.
    half: "choose" or "report" (scikit-learn's 13 writers), or "unseen" (the 30 other writers, fetched into
    data_dir). count: only the first `count` digits (for tests)."""
    images, labels = data_file.uci_unseen_digits(data_dir) if half == "unseen" else data_file.uci_digits(half)
    images, labels = images[:count], labels[:count]
    result = {}
    with predict_path(model) as model:
        for form in data_file.UCI_FORMS:
            right = 0
            for image, label in zip(images, labels.tolist()):
                png = io.BytesIO(data_file.uci_png(image, form))
                digit = data_file.digit_from_image(png, name=f"a UCI digit ({form})")
                right += int(digit_probabilities(model, digit, tta).argmax()) == label
            result[form] = 100 * right / len(labels)
    return result


def digits_probabilities(model, digits, tta=False):
    """The probabilities (N, 10), numpy, of digits prepared by digit_image (N, 28, 28): for one digit exactly
    digit_probabilities."""
    return predict_log_probs(model, torch.from_numpy(digits)[:, None], tta).exp().numpy()


def checkpoint_probabilities(model, checkpoint):
    """digits_probabilities of a loaded checkpoint's network, with TTA when its run was scored with it: what a
    serve.Predictor answers with."""
    tta = checkpoint_tta(checkpoint)
    return lambda digits: digits_probabilities(model, digits, tta)


def read_number(model, tta, path, name=None, max_pixels=None):
    """The digits written in a row in an image file (digit_image.read_digits, the network judging where touching
    digits part) and their probabilities: (Reading, numpy (N, 10)), what `predict` and the server answer."""
    judge = lambda digits: digits_probabilities(model, digits, tta).max(1)
    reading = digit_image.read_digits(path, name, max_pixels, judge=judge)
    return reading, digits_probabilities(model, reading.digits, tta)


def predict_lines(model, tta, paths, as_json=False):
    """What `python main.py predict` prints of each image file, as (line, kind): kind None for its answer (a line
    of digit_image.describe, or with `as_json` one JSON object), "note" for what the reading noticed, "error" for a
    file that cannot be read; the other files are still read."""
    for path in paths:
        try:
            reading, probs = read_number(model, tta, path)
        except digit_image.ImageError as e:
            yield f"error: {e}", "error"
            continue
        if as_json:
            answer = digit_image.answer(reading, probs, previews=False)
            keep = {k: answer[k] for k in ("number", "digits", "note") if k in answer}
            yield json.dumps({"file": path, **keep}), None
            continue
        yield f"{path}: {digit_image.describe(probs)}", None
        if reading.note:
            yield f"{path}: {reading.note}", "note"


def score_numbers(model, tta, data_dir, count=1000, seed=0, split="test"):
    """Numbers written with MNIST's `split` digits (data_file.compose_numbers: 2-6 digits, 0-8 px apart), read
    through predict's path (each one's PNG file, read_number). Returns {"numbers", "exact" (% read exactly),
    "digits" (% of digits read right, in numbers whose digits were all found), "found" (% with as many digits as
    written), "by_length" / "by_gap": {n: [numbers, % exact]}}."""
    images, labels = data_file.read_split(data_dir, split)
    numbers = data_file.compose_numbers(images.numpy(), labels.numpy(), count, seed)
    by_length, by_gap, digits_right, digits_seen, found = {}, {}, 0, 0, 0
    with predict_path(model) as model:
        for page, written, gap in numbers:
            _, probs = read_number(model, tta, io.BytesIO(data_file.number_png(page)), name="a composed number")
            read = "".join(str(d) for d in probs.argmax(1))
            for table, key in ((by_length, len(written)), (by_gap, gap)):
                table.setdefault(key, []).append(read == written)
            if len(read) == len(written):
                found += 1
                digits_seen += len(written)
                digits_right += sum(a == b for a, b in zip(read, written))
    exact = [read_right for rows in by_length.values() for read_right in rows]
    table = lambda rows: {k: [len(v), 100 * sum(v) / len(v)] for k, v in sorted(rows.items())}
    return {"numbers": len(numbers), "exact": 100 * sum(exact) / len(exact),
            "digits": 100 * digits_right / max(digits_seen, 1), "found": 100 * found / len(numbers),
            "by_length": table(by_length), "by_gap": table(by_gap)}


def number_lines(result):
    """What `python main.py evaluate --numbers` prints of score_numbers."""
    table = lambda rows: ", ".join(f"{k}: {acc:.1f}% ({n})" for k, (n, acc) in rows.items())
    return [f"numbers written with test digits, {result['numbers']:,}: {result['exact']:.2f}% read exactly, "
            f"digits {result['digits']:.2f}% right, as many digits as written {result['found']:.2f}%",
            f"  by length (numbers): {table(result['by_length'])}",
            f"  by gap in px (numbers): {table(result['by_gap'])}; 2 px or more: {spaced(result):.2f}%"]


def spaced(result):
    """The % of score_numbers' numbers read exactly among those whose digits are 2 px apart or more."""
    rows = [(n, acc) for gap, (n, acc) in result["by_gap"].items() if gap >= 2]
    return sum(n * acc for n, acc in rows) / max(sum(n for n, _ in rows), 1)


def per_class_accuracy(confusion):
    """Accuracy in % of each true digit (a row of the confusion matrix): [10 floats]."""
    return [100 * row[d] / sum(row) if sum(row) else float("nan") for d, row in enumerate(confusion)]


def train_one_epoch(model, optimizer, scheduler, batches, steps=None, *, clip_grad=1.0, augment=None,
                    label_smoothing=0.0, desc="train", progress=True, postfix_every=50, ema=None):
    """Train one pass over `batches`, an iterable of (images, labels) of `steps` batches (default:
    len(batches)), e.g. data_file.batches(...) or a DataLoader; augment each batch with `augment(images, labels)`
    (augmentation) if given, step the scheduler after every batch, and update `ema` (a moving_average of the
    model) if given.

    Returns {"loss": mean training loss, "train_acc": running training accuracy in % (measured on each
    batch as it was trained, dropout and augmentation on), "steps", "seconds", "curve": [step, loss,
    train_acc, lr] every `postfix_every` steps, as running means over the epoch so far}. Raises
    NonFiniteLoss at the first step whose loss is NaN or infinite, before that step updates the weights.
    """
    model.train()
    steps = len(batches) if steps is None else steps
    params = [p for p in model.parameters() if p.requires_grad]  # walked once, not every step
    loss_sum, correct, seen, curve = 0.0, 0, 0, []
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar, 1):
        if augment is not None:
            x = augment(x, y)
        output = model(x)
        if label_smoothing:
            loss = F.cross_entropy(output, y, label_smoothing=label_smoothing)
        else:
            loss = F.nll_loss(output, y)  # the models return log-probabilities
        loss_value = loss.item()
        if not math.isfinite(loss_value):
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
            point = [step, loss_sum / seen, 100 * int(correct) / seen, scheduler.get_last_lr()[0]]
            curve.append(point)
            bar.set_postfix(loss=f"{point[1]:.4f}", acc=f"{point[2]:.2f}%", lr=f"{point[3]:.2e}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return {"loss": loss_sum / seen, "train_acc": 100 * int(correct) / seen, "steps": steps,
            "seconds": seconds, "curve": curve}


# Test-time augmentation: the image as it is and moved one pixel left, right, up and down (dx, dy).
TTA_SHIFTS = digit_image.TTA_SHIFTS


@torch.inference_mode()
def predict_log_probs(model, images, tta=False):
    """The model's log-probabilities (B, 10) for a batch; with tta, the log of its softmax averaged over
    the image and its four one-pixel shifts (TTA_SHIFTS). The caller puts the model in eval mode."""
    if not tta:
        return model(images)
    h, w = images.shape[-2:]
    # Edge pixels repeat into the gap, as in data_file.random_transform; in MNIST they are background.
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    probs = sum(model(padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]).exp() for dx, dy in TTA_SHIFTS)
    return (probs / len(TTA_SHIFTS)).log()


def digit_probabilities(model, digit, tta=False):
    """The probabilities (10,) of one digit prepared by data_file.digit_from_image (1, 28, 28): what `predict`
    and the server answer, with TTA when the checkpoint's run was scored with it (checkpoint_tta)."""
    return predict_log_probs(model, digit[None], tta).exp()[0]


def checkpoint_tta(checkpoint):
    """Whether a checkpoint's run scored with test-time augmentation, so predictions should use it too."""
    config = checkpoint.get("config")
    return bool(config.get("tta")) if isinstance(config, dict) else False


@torch.inference_mode()
def measure(model, images, labels, batch_size=1000, details=False, tta=False):
    """Loss (mean negative log-likelihood) and accuracy in % over (images, labels), in eval mode, in order;
    with tta, of the prediction averaged over one-pixel shifts (predict_log_probs).

    With details=True also "confusion" (10x10 counts, rows true, columns predicted) and "mistakes": the
    16 most confidently wrong [index, true, predicted, confidence], most confident first.
    """
    model.eval()
    output = torch.cat([predict_log_probs(model, x, tta) for x, _ in data_file.batches(images, labels, batch_size)])
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
