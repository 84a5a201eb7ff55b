"""The one-epoch reference's "Observations", measured: one epoch of `net` over batch size x dropout x seeds.

    python sweep.py                              # 4 batch sizes x 4 dropouts x 2 seeds, ~10 min on 2 cores
    python sweep.py --seeds 1 2 3 --out-dir runs/sweep

Each cell trains the net-1epoch recipe (Adam + OneCycleLR, one epoch) with that batch size and dropout, and
records running train accuracy (measured while training), evaluated train accuracy (the final model on all
60,000 training images, eval mode), test accuracy and seconds. Finished cells are appended to
<out-dir>/sweep.jsonl as they finish, and a rerun skips them, so an interrupted sweep loses nothing.
At the end it writes <out-dir>/sweep.md (a markdown table) and sweep.png.
"""
import argparse
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data_file  # noqa: E402
import model_train  # noqa: E402
import recipes  # noqa: E402
import run_folder  # noqa: E402
from errors import UserError  # noqa: E402


def read_done(path):
    """Cells already in the results file, keyed by (batch_size, dropout, seed)."""
    done = {}
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[(row["batch_size"], row["dropout"], row["seed"])] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line cut off by an interrupted write, or not a cell's: that cell runs again
    return done


def summarise(rows, batch_sizes, dropouts):
    """Markdown table: one row per (batch size, dropout), mean ± std over seeds."""
    def cell(values):
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 \
            else f"{values[0]:.2f}"

    lines = ["| batch | dropout | seeds | running train acc % | evaluated train acc % | test acc % | "
             "train − test (evaluated) | seconds |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in batch_sizes:
        for d in dropouts:
            cell_rows = [r for r in rows if r["batch_size"] == b and r["dropout"] == d]
            if not cell_rows:
                continue
            get = lambda k: [r[k] for r in cell_rows]  # noqa: E731
            gap = [r["eval_train_acc"] - r["test_acc"] for r in cell_rows]
            lines.append(f"| {b} | {d} | {len(cell_rows)} | {cell(get('train_acc'))} | "
                         f"{cell(get('eval_train_acc'))} | {cell(get('test_acc'))} | {cell(gap)} | "
                         f"{cell(get('seconds'))} |")
    return "\n".join(lines) + "\n"


def plot(rows, batch_sizes, dropouts):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for d in dropouts:
        xs, run, test = [], [], []
        for b in batch_sizes:
            cell_rows = [r for r in rows if r["batch_size"] == b and r["dropout"] == d]
            if cell_rows:
                xs.append(b)
                run.append(statistics.mean(r["train_acc"] for r in cell_rows))
                test.append(statistics.mean(r["test_acc"] for r in cell_rows))
        axes[0].plot(xs, test, "o-", label=f"dropout {d}")
        axes[1].plot(xs, run, "o-", label=f"dropout {d}")
    axes[0].set(title="test accuracy (%)", xlabel="batch size", xscale="log")
    axes[1].set(title="running train accuracy (%)", xlabel="batch size", xscale="log")
    for ax in axes:
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.suptitle("net, one epoch (mean over seeds)")
    fig.tight_layout()
    return fig


def parse_args(argv):
    p = argparse.ArgumentParser(description="Seed-1 network: batch size x dropout x seed, one epoch each.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", type=recipes.flag_type(int, "positive"), nargs="+", default=[128, 100, 50, 10])
    p.add_argument("--dropouts", type=recipes.flag_type(float, "fraction_or_zero"), nargs="+",
                   default=[0.25, 0.2, 0.1, 0.005])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (fetched if missing)")
    p.add_argument("--out-dir", default=os.path.join(run_folder.RUNS, "sweep"), help="results folder")
    return p.parse_args(argv)


def sweep(argv=None):
    args = parse_args(argv)
    results = os.path.join(args.out_dir, "sweep.jsonl")
    cells = [(b, d, s) for b in args.batch_sizes for d in args.dropouts for s in args.seeds]
    done = {}
    try:
        run_folder.prepare(args.out_dir)
        done = read_done(results)
        data = data_file.load_mnist(args.data_dir)
        for b, d, s in tqdm(cells, desc="sweep", initial=0, dynamic_ncols=True):
            if (b, d, s) in done:
                continue
            config = recipes.recipe_config("net-1epoch", batch_size=b, dropout=d, seed=s, data_dir=args.data_dir)
            model, metrics = model_train.train(config, log=lambda *a: None, data=data, progress=False)
            row = {"batch_size": b, "dropout": d, "seed": s, "train_acc": metrics["train_acc"],
                   "eval_train_acc": model_train.measure(model, *data["train"])["acc"],
                   "test_acc": metrics["test_acc"], "seconds": metrics["train_seconds"],
                   "torch": metrics["torch"], "threads": metrics["threads"]}
            with open(results, "a") as f:  # one line per finished cell: an interruption loses only the cell in hand
                f.write(json.dumps(row) + "\n")
            done[(b, d, s)] = row
        rows = [done[c] for c in cells]
        table = summarise(rows, args.batch_sizes, args.dropouts)
        run_folder.atomic_write(os.path.join(args.out_dir, "sweep.md"), lambda f: f.write(table.encode()))
        fig = plot(rows, args.batch_sizes, args.dropouts)
        run_folder.atomic_write(os.path.join(args.out_dir, "sweep.png"),
                                lambda f: fig.savefig(f, format="png", dpi=110))
    except KeyboardInterrupt:
        print(f"interrupted: {len(done)} of {len(cells)} cells are in {results}; run again to finish",
              file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or args.out_dir}: {e.strerror}", file=sys.stderr)
        return 1
    print(table)
    print(f"wrote {args.out_dir}/sweep.md and sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(sweep())
