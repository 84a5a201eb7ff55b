"""The settings of a training run: `Config`, each field declared once with its default, help and check; the
recipes (named sets of values, chosen by purpose); and the command-line flags built from the fields.

    config = recipe_config("ressenet-8epoch", seed=2)   # what `python main.py --recipe ressenet-8epoch --seed 2` trains

A field is also the flag of the same name (main.py's parser loops over the fields). How each recipe was chosen,
and the flags of the recipes it beat, is in docs/experiments.md; what each reaches, in README.md.
"""
import argparse
import dataclasses
import difflib
import math

import data_file
from errors import UserError
from model import MODELS, NOT_DIGIT_MODELS, ROW_MARK_MODELS

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
    the command-line flag of the same name (main.py builds the parser from these fields). Where the run trains
    (--device) and whether it is a dry run are the run's, not its config's: they change no figure it is meant to
    reach."""
    recipe: str = setting("net-1epoch", "the recipe these values started from", cli=False)
    model: str = setting("net", "network to train", choices=tuple(sorted(MODELS)))
    dropout: float = setting(0.005, "dropout probability of the network", "fraction_or_zero")
    epochs: int = setting(1, "number of epochs", "positive")
    batch_size: int = setting(10, "training batch size", "positive")
    optimizer: str = setting("adam", "adam: Adam (AdamW with --weight-decay) under OneCycleLR; sgd: SGD with momentum "
                                     "0.9 at the constant rate --max-lr", choices=("adam", "sgd"))
    max_lr: float = setting(0.005, "OneCycleLR peak learning rate (the rate itself with --optimizer sgd)",
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
    restyle: float = setting(0.0, "augmentation: fraction of training digits given another writer's look "
                                  "(thicker, coarse or blurred strokes)", "fraction_or_zero")
    digit_variants: float = setting(0.0, "augmentation: fraction of the 1s and 9s drawn as other writers draw "
                                         "them (flagged or block 1s, 9s whose tail hooks back)", "fraction_or_zero")
    clean_epochs: int = setting(0, "train the last N epochs on the digits as they are, without the augmentation "
                                   "above", "non_negative")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss", "fraction_or_zero")
    not_digits: float = setting(0.0, "weight of the loss that teaches a network with a 'not a digit' output "
                                     "(ressenet-nd) to give it to images that hold no digit; for a row reader "
                                     "with a mark class (rows-nd), the share of rows holding such marks (0: none)",
                                "non_negative")
    ema: float = setting(0.0, "score and keep a moving average of the weights, with this decay per step "
                              "(0: the weights)", "fraction_or_zero")
    tta: bool = setting(False, "also score validation and test (and predict) on the softmax averaged over the "
                               "image and its four one-pixel shifts")
    seed: int = setting(1, "random seed", "seed")
    kernels: str = setting("fast", "fast: fused Adam, and on the CPU the convolutions each network is fastest with; "
                                   "exact: torch's default kernels throughout; tf32: fast, with TensorFloat-32 "
                                   "matmuls and convolutions on CUDA (rounded to 10 bits)",
                           choices=("fast", "exact", "tf32"))
    data_dir: str = setting("./data", "where MNIST is kept (fetched if missing)")


# Recipes by purpose. Each is a named base below plus a few overrides, never another recipe, so changing one
# recipe changes no other; test_train.py pins every recipe's values. Values not given are Config's defaults.
# What each reaches is in README.md; how each was chosen, and the flags of the recipes it beat, in
# docs/experiments.md.
#
# The <20k reference's kind of training: AdamW + OneCycleLR at batch 512, shifts and small rotations, label smoothing,
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
    # The one-epoch reference: the 13,242-parameter CNN, Adam + OneCycleLR (flat at 0.005 for the first 10%, then
    # annealed to 0.0005), batch 10, gradient norm clipped to 1.0, one epoch on all 60,000 images.
    "net-1epoch": dict(),
    # The <20k reference: >= 99.4% on the test set in 8 epochs with BatchNorm, attention, residuals and GAP.
    "ressenet-8epoch": dict(RESSENET),
    # The <20k reference's own training on our network: SGD at a constant 0.05 with momentum 0.9, batch 128, 19 epochs,
    # nothing else (no augmentation, label smoothing, weight decay or clipping).
    "ressenet-sgd-19epoch": dict(model="ressenet", dropout=0.1, epochs=19, batch_size=128, optimizer="sgd",
                                 max_lr=0.05, clip_grad=0.0, val_size=10_000),
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
                                                digit_variants=0.5, clean_epochs=2),
    # The reader that says "not a digit" (predict, serve, the page): the reader's training on a network twice as wide
    # with an 11th output, images that hold no digit (not_digits.training_images) joined to every batch at weight
    # 0.1, and a 5,000-digit validation split to set its temperature and threshold on.
    "ressenet-nd-writers-clean-30epoch": dict(RESSENET, model="ressenet-nd", epochs=30, batch_size=256, max_lr=0.02,
                                              scale=0.1, val_size=5_000, ema=0.999, restyle=0.25, digit_variants=0.5,
                                              clean_epochs=2, not_digits=0.1),
    # The row reader (model.RowNet) that finds the digits in a row for every digit network (predict, serve, the
    # page): CTC on rows of 1-8 training digits composed on the fly (row_train.py), 3 epochs of 1,563 batches of 32
    # rows, a 50k/10k train/validation split of the digits the rows are made of.
    "rows-ctc": dict(model="rows", epochs=3, batch_size=32, max_lr=0.004, pct_start=0.15, div_factor=10.0,
                     final_div_factor=100.0, weight_decay=5e-4, val_size=10_000, dropout=0.1),
    # The same, finding marks that are no digit too: a fifth of the rows hold a letter, symbol or scribble; a
    # fourth epoch, as the marks take a fifth of its rows.
    "rows-nd-ctc": dict(model="rows-nd", epochs=4, batch_size=32, max_lr=0.004, pct_start=0.15, div_factor=10.0,
                        final_div_factor=100.0, weight_decay=5e-4, val_size=10_000, dropout=0.1, not_digits=0.2),
    # The most accurate at <= 3,500 parameters.
    "ressenet-micro-clean-40epoch": dict(SMALL_NETWORK, model="ressenet-micro"),
    # The most accurate at <= 1,000 parameters.
    "shared-nano-clean-40epoch": dict(SMALL_NETWORK, model="shared-nano"),
}
# The names these recipes had before; still accepted, no longer listed.
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
    "ressenet-wide-writers-30epoch": ("ressenet-wide-writers-clean-30epoch", dict(clean_epochs=0)),
}
# Retired recipes whose flags left the code too (--elastic, 9s curled instead of hooked): where they can still be
# run, and the log section that measured them.
GONE = {
    "ressenet-micro-elastic-40epoch": "docs/experiments.md, 2026-12-02: `ressenet-micro-elastic-40epoch` on the "
                                      "test set",
    "ressenet-wide-variants-30epoch": "docs/experiments.md, 2026-12-02: `ressenet-wide-variants-30epoch` on the "
                                      "test set and the UCI report half",
}
LAST_COMMIT_WITH_GONE = "7ee6014"  # `git checkout 7ee6014` runs the recipes in GONE as they ran


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
    ignored, so a checkpoint written before a setting existed loads with that setting's default. Before
    2026-12-07 the kernels were two switches (exact, tf32): read as the choice they made."""
    if "kernels" not in stored and (stored.get("exact") or stored.get("tf32")):
        stored = {**stored, "kernels": "exact" if stored.get("exact") else "tf32"}
    return Config(**{f.name: stored[f.name] for f in dataclasses.fields(Config) if f.name in stored})


# --- a Config on the command line: each field's flag comes from its setting(); main.py adds the run's own flags.

def recipe_flag(name):
    """--recipe's type: a recipe's name (an old name is taken as the recipe's); a retired recipe is refused with
    the recipe and flags that make the same run, a mistyped one with the nearest name."""
    if name in RETIRED:
        recipe, changes = RETIRED[name]
        raise argparse.ArgumentTypeError(f"{name} has left the recipe list; the same run is `--recipe {recipe} "
                                         f"{' '.join(as_flags(changes))}` (docs/experiments.md)")
    if name in GONE:
        raise argparse.ArgumentTypeError(f"{name} has left the recipe list and its flags the code; it runs at "
                                         f"commit {LAST_COMMIT_WITH_GONE} ({GONE[name]})")
    name = ALIASES.get(name, name)
    if name not in RECIPES:
        near = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise argparse.ArgumentTypeError(f"no recipe {name!r}{hint} (recipes: {', '.join(RECIPES)})")
    return name


def add_config_flags(p, shown=None):
    """--recipe and one flag per Config field that has one, typed, checked and described as the field says.

    Each defaults to "not given" (argparse.SUPPRESS), so the parsed flags are exactly those the command line gave
    (config_from_flags puts them over the recipe's values). `shown`: a recipe whose values the help shows as the
    defaults (`python main.py --recipe R --help`)."""
    values = dataclasses.asdict(recipe_config(shown)) if shown else {}

    def described(text, name):
        text = text.replace("%", "%%")
        return f"{text} (default: {values[name]})" if name in values else text
    p.add_argument("--recipe", type=recipe_flag, choices=sorted(RECIPES), default=argparse.SUPPRESS,
                   help=described("named set of defaults for the flags below", "recipe"))
    for field in dataclasses.fields(Config):
        meta = field.metadata
        if not meta["cli"]:
            continue
        kwargs = dict(dest=field.name, default=argparse.SUPPRESS, help=described(meta["help"], field.name))
        if field.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=flag_type(field.type, meta["check"]) if meta["check"] else field.type,
                          choices=meta["choices"])
        p.add_argument(*(meta["flags"] or ["--" + field.name.replace("_", "-")]), **kwargs)


def given_fields(args):
    """The Config fields an add_config_flags parse was given: {name: value}."""
    names = {"recipe"} | {f.name for f in dataclasses.fields(Config) if f.metadata["cli"]}
    return {name: getattr(args, name) for name in sorted(names) if hasattr(args, name)}


class ConfigError(UserError):
    """Settings that cannot train together; the message says what to change."""


def check(config):
    """`config`, or a ConfigError when a "not a digit" setting cannot work: the weight on a network without that
    output, or such a network without the validation split its temperature and threshold are chosen on."""
    if config.not_digits and config.model not in NOT_DIGIT_MODELS + ROW_MARK_MODELS:
        raise ConfigError(f"--not-digits trains a 'not a digit' output, which {config.model} has none of "
                          f"(networks with one: {', '.join(NOT_DIGIT_MODELS + ROW_MARK_MODELS)})")
    if config.model in NOT_DIGIT_MODELS and not config.val_size:
        raise ConfigError(f"{config.model} chooses its temperature and threshold on a validation split: give "
                          f"--val-size (its recipe carves 5000)")
    return config


def config_from_flags(args):
    """The training config: the recipe the flags name (net-1epoch when none), the given flags over its values."""
    given = given_fields(args)
    return check(recipe_config(given.pop("recipe", "net-1epoch"), **given))
