"""The results table of a set of run folders: one row per config, mean ± sample std over its seeds.

    python main.py report                      # every folder under runs/, as Markdown
    python main.py report runs/a runs/b --csv

A row is one config (every value in it but the seed and where the data is kept) measured on one device with
one torch version: runs that differ in anything else are never averaged together, and a seed run twice counts
once (the newest). A row's recipe column names
the recipe and the flags that moved the config off it, so each row says how to make it again. Dry runs, and
runs that did not finish (no metrics.json, or one without a test figure), are left out and counted. The UCI
column is filled where every run of the row was scored with `python main.py evaluate RUN --uci-digits`: the
mean over seeds of the mean over the four forms, and the worst form's mean over seeds; the unseen writers'
column (the UCI digits' 30 other writers, which chose nothing) likewise, shown once a row has it.
"""
import csv
import dataclasses
import io
import os
import statistics

import recipes
import run_folder
from model import ROW_MODELS

# What a row averages over, and what changes no figure: the device asked for is folded into the one the run
# recorded (a --device cpu run on a machine without a GPU is the default run).
IGNORED = ("seed", "data_dir", "device")


@dataclasses.dataclass
class Row:
    recipe: str        # the recipe and the flags that change its config, e.g. "net-1epoch --batch-size 50"
    model: str
    parameters: int
    epochs: int
    seeds: list
    test_acc: list     # single-view, one per seed, in the order of `seeds`
    test_acc_tta: list  # empty when the config scored no TTA
    train_seconds: list
    uci: list          # per seed {form: accuracy} (`evaluate --uci-digits`); empty unless every seed has one
    unseen: list       # the same on the UCI digits' 30 unseen writers
    device: str
    torch: str


def collect(folders):
    """(rows, left_out) for run folders: rows in the order of the recipes in recipes.RECIPES, seeds sorted
    within a row, and left_out {"dry runs": n, "unfinished runs": n, ...} for those not in any row."""
    groups, left_out = {}, {}
    for folder in folders:
        kind, run = classify(folder)
        if kind != "finished":
            left_out[kind] = left_out.get(kind, 0) + 1
            continue
        config = dataclasses.asdict(recipes.config_from_dict(run["config"]))
        key = (tuple((k, v) for k, v in sorted(config.items()) if k not in IGNORED),
               run.get("device"), run.get("torch"))
        written = os.path.getmtime(os.path.join(folder, run_folder.METRICS))
        groups.setdefault(key, []).append((config, {**run, "uci": run_folder.read_uci(folder),
                                                    "unseen": run_folder.read_uci(folder, "unseen")}, written))
    order = ("dry runs", "unfinished runs", "unreadable runs", "folders that are not runs", "repeated seeds")
    rows = []
    for runs in groups.values():
        newest = {}  # the same config and seed twice is one run measured twice: the newest counts
        for config, run, written in sorted(runs, key=lambda r: r[2]):
            if config["seed"] in newest:
                left_out["repeated seeds"] = left_out.get("repeated seeds", 0) + 1
            newest[config["seed"]] = (config, run)
        rows.append(make_row(list(newest.values())))
    rows.sort(key=recipe_order)  # stable: else as first seen
    return rows, {k: left_out[k] for k in order if k in left_out}


def recipe_order(row):
    """Rows in the order recipes.RECIPES lists their recipes; unknown recipes last."""
    names = list(recipes.RECIPES)
    name = row.recipe.split()[0]
    return names.index(name) if name in names else len(names)


def classify(folder):
    """(kind, its metrics.json or None): kind is "finished", "dry runs", "unfinished runs", "unreadable runs" or
    "folders that are not runs" (the left-out count). Each metrics.json is read once."""
    if not os.path.isdir(folder):
        raise run_folder.RunFolderError(f"{folder}: no such run folder")
    has = {name for name in (run_folder.METRICS, run_folder.RESUME) if os.path.exists(os.path.join(folder, name))}
    if run_folder.METRICS not in has:
        return ("unfinished runs" if has else "folders that are not runs"), None
    try:
        run = run_folder.read_metrics(folder)
    except run_folder.RunFolderError:  # cut off or damaged: one bad folder does not stop the table
        return "unreadable runs", None
    if not isinstance(run.get("config"), dict):
        return "folders that are not runs", None
    if run.get("dry_run") or run["config"].get("dry_run"):  # the config held it before 2026-12-07
        return "dry runs", run
    return ("finished" if "test_acc" in run and "train_seconds" in run else "unfinished runs"), run


def make_row(runs):
    runs = sorted(runs, key=lambda r: r[0]["seed"])
    config, run = runs[0]
    recipe = config["recipe"]
    return Row(recipe=" ".join([recipe, *flags_off_recipe(config)]), model=config["model"],
               parameters=run["parameters"], epochs=config["epochs"], seeds=[c["seed"] for c, _ in runs],
               test_acc=[r["test_acc"] for _, r in runs],
               test_acc_tta=[r["test_acc_tta"] for _, r in runs if "test_acc_tta" in r],
               train_seconds=[r["train_seconds"] for _, r in runs],
               uci=[r["uci"] for _, r in runs] if all(r["uci"] for _, r in runs) else [],
               unseen=[r["unseen"] for _, r in runs] if all(r["unseen"] for _, r in runs) else [],
               device=run.get("device", "?"),
               torch=run.get("torch", "?"))


def flags_off_recipe(config):
    """The command-line flags that turn the recipe's config into this one (seed and data dir aside); a retired
    recipe's run folder is read against the config it ran (recipes.RETIRED)."""
    name = config["recipe"]
    if name in recipes.RECIPES:
        base = dataclasses.asdict(recipes.recipe_config(name))
    elif name in recipes.RETIRED:
        base = dataclasses.asdict(recipes.retired_config(name))
    elif name in recipes.GONE:
        return [f"(retired: runs at commit {recipes.LAST_COMMIT_WITH_GONE})"]
    else:
        return ["(unknown recipe)"]
    return recipes.as_flags({k: v for k, v in config.items() if k not in IGNORED and v != base[k]})


def mean_std(values, digits, unit=""):
    """"mean ± sample std" (just the mean for one value, "—" for none)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}{unit}"


COLUMNS = ("recipe", "network", "parameters", "epochs", "n", "seeds", "test, single-view", "test, with TTA",
           "UCI, 13 writers (worst form)", "UCI, 30 unseen writers (worst form)", "training", "device", "torch")


def uci_figures(row, writers="uci"):
    """(per-seed means over the forms, the worst form's mean over seeds), or (None, None) without UCI scores;
    writers "uci" (the 13 writers' report half) or "unseen" (the 30 other writers)."""
    scores = getattr(row, writers)
    if not scores:
        return None, None
    per_seed = [statistics.mean(forms.values()) for forms in scores]
    worst = min(statistics.mean(forms[f] for forms in scores) for f in scores[0])
    return per_seed, worst


def cells(row):
    uci = []
    for writers in ("uci", "unseen"):
        per_seed, worst = uci_figures(row, writers)
        uci.append("—" if per_seed is None else f"{mean_std(per_seed, 1, '%')} ({worst:.1f}%)")
    return [row.recipe, row.model, f"{row.parameters:,}", str(row.epochs), str(len(row.seeds)),
            ", ".join(map(str, row.seeds)), mean_std(row.test_acc, 2, "%"), mean_std(row.test_acc_tta, 2, "%"),
            *uci, mean_std(row.train_seconds, 1, " s"), row.device, row.torch]


RIGHT = {"parameters", "epochs", "n", "test, single-view", "test, with TTA", "UCI, 13 writers (worst form)",
         "UCI, 30 unseen writers (worst form)", "training"}
SHARED = ("n", "seeds", "device", "torch")  # said once under the table when every row has the same


def to_markdown(rows):
    """A Markdown table; of SHARED, the columns that every row (of two or more) has the same are said once
    in a line under it, so a table of many recipes stays readable."""
    table = [cells(row) for row in rows]
    shared = [i for i, name in enumerate(COLUMNS)
              if name in SHARED and len(table) > 1 and len({r[i] for r in table}) == 1]
    unseen = COLUMNS.index("UCI, 30 unseen writers (worst form)")  # shown once some row has been scored on them
    keep = [i for i in range(len(COLUMNS)) if i not in shared and (i != unseen or any(r[i] != "—" for r in table))]
    lines = ["| " + " | ".join(COLUMNS[i] for i in keep) + " |",
             "|" + "|".join("---:" if COLUMNS[i] in RIGHT else "---" for i in keep) + "|"]
    for row, c in zip(rows, table):
        c[0] = f"`{c[0]}`" + (" †" if row.model in ROW_MODELS else "")
        lines.append("| " + " | ".join(c[i] for i in keep) + " |")
    if shared:
        lines += ["", "Every row: " + ", ".join(f"{COLUMNS[i]} {table[0][i]}" for i in shared) + "."]
    if any(row.model in ROW_MODELS for row in rows):
        lines += ["", "†: a row reader; its test figure is the share of composed test rows it reads exactly alone."]
    return "\n".join(lines) + "\n"


def to_csv(rows):
    """One line per row; the figures as numbers (mean and std apart), seeds separated by spaces."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["recipe", "network", "parameters", "epochs", "n", "seeds", "test_acc_mean", "test_acc_std",
                "test_acc_tta_mean", "test_acc_tta_std", "uci_acc_mean", "uci_acc_std", "train_seconds_mean",
                "train_seconds_std", "uci_worst_form", "unseen_acc_mean", "unseen_worst_form", "device", "torch"])
    for row in rows:
        per_seed, worst = uci_figures(row)
        unseen, unseen_worst = uci_figures(row, "unseen")
        figures = []
        for values in (row.test_acc, row.test_acc_tta, per_seed or [], row.train_seconds):
            figures += [f"{statistics.mean(values):.4f}" if values else "",
                        f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""]
        figures.append("" if worst is None else f"{worst:.4f}")
        figures += [f"{statistics.mean(unseen):.4f}" if unseen else "", "" if unseen_worst is None else
                    f"{unseen_worst:.4f}"]
        w.writerow([row.recipe, row.model, row.parameters, row.epochs, len(row.seeds),
                    " ".join(map(str, row.seeds)), *figures, row.device, row.torch])
    return out.getvalue()
