"""Figures for a run folder, drawn from its metrics.json: training curves, the test confusion matrix and the
test digits the model got most confidently wrong.

    python plots.py runs/seed1-seed1            # (re)draw curves.png, confusion.png, mistakes.png there

main.py calls save_plots after every run it saves.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

import data_file  # noqa: E402
import run_folder  # noqa: E402
from errors import exit_status  # noqa: E402


def plot_curves(metrics):
    """Running loss and accuracy through training, learning rate, and validation accuracy per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, loss, acc, lr, offset = [], [], [], [], 0
    for epoch in metrics["epochs"]:
        for step, point_loss, point_acc, point_lr in epoch["curve"]:
            steps.append(offset + step)
            loss.append(point_loss)
            acc.append(point_acc)
            lr.append(point_lr)
        offset += epoch["steps"]
    axes[0].plot(steps, loss)
    axes[0].set(title="training loss (running mean per epoch)", xlabel="step", yscale="log")
    axes[1].plot(steps, acc, label="running train accuracy")
    for key, name in (("val_acc", "validation accuracy"), ("val_acc_tta", "validation accuracy with TTA")):
        val = [(e["epoch"] * e["steps"], e[key]) for e in metrics["epochs"] if key in e]
        if val:
            axes[1].plot(*zip(*val), "o-", label=name)
    for key, name, style in (("test_acc", "test accuracy", ":"), ("test_acc_tta", "test accuracy with TTA", "--")):
        if key in metrics:
            axes[1].axhline(metrics[key], color="k", ls=style, label=f"{name} {metrics[key]:.2f}%")
    axes[1].set(title="accuracy (%)", xlabel="step", ylim=(max(0, min(acc[len(acc) // 10:] + [95]) - 1), 100))
    axes[1].legend(loc="lower right", fontsize=8)
    axes[2].plot(steps, lr)
    axes[2].set(title="learning rate (OneCycleLR)", xlabel="step")
    fig.suptitle(f"{metrics['model']} ({metrics['parameters']:,} parameters), recipe {metrics['recipe']}, "
                 f"seed {metrics['seed']}")
    fig.tight_layout()
    return fig


def plot_confusion(metrics):
    """Counts of true (rows) against predicted (columns) digits on the test set."""
    confusion = metrics["confusion"]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(confusion, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=1))
    for t in range(10):
        for p in range(10):
            if confusion[t][p]:
                ax.text(p, t, confusion[t][p], ha="center", va="center", fontsize=7,
                        color="white" if t == p else "black")
    tta = "test_acc_tta" in metrics  # the confusion counts are of the prediction the run is scored on
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"test set: {metrics['test_acc_tta' if tta else 'test_acc']:.2f}% correct{' with TTA' if tta else ''}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_mistakes(metrics, test_images):
    """The test digits the model got most confidently wrong, with true and predicted labels."""
    mistakes = metrics["mistakes"]
    cols = 8
    rows = max(1, -(-len(mistakes) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (index, true, pred, confidence) in zip(axes.flat, mistakes):
        ax.imshow(test_images[index].numpy(), cmap="gray")
        ax.set_title(f"true {true}, said {pred}\n{100 * confidence:.0f}% sure", fontsize=7)
    fig.suptitle("most confidently wrong test digits", fontsize=9)
    fig.tight_layout()
    return fig


def save_plots(run_dir, metrics, data_dir, written=()):
    """Draw the three figures into run_dir, each written atomically; return their file names. `written`: the
    run folder's files already written, named if a figure cannot be (run_folder.write_files)."""
    test_images = data_file.read_split(data_dir, "test")[0]
    figures = {"curves.png": plot_curves(metrics), "confusion.png": plot_confusion(metrics),
               "mistakes.png": plot_mistakes(metrics, test_images)}
    try:
        run_folder.write_files(run_dir, [(name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110))
                                         for name, fig in figures.items()], written)
    finally:
        plt.close("all")
    return list(figures)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw a run folder's figures from its metrics.json.")
    p.add_argument("run_dir", help="a folder with metrics.json, written by main.py")
    args = p.parse_args(argv)
    return exit_status(lambda: redraw(args.run_dir))


def redraw(run_dir):
    """Draw a run folder's figures again from its metrics.json, and print their paths."""
    try:
        run = run_folder.read_metrics(run_dir)
        data_dir = run.get("config", {}).get("data_dir", "./data")
        data_file.ensure_mnist(data_dir)  # the mistakes are drawn from the test images
        names = save_plots(run_dir, run, data_dir)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise run_folder.RunFolderError(f"{os.path.join(run_dir, 'metrics.json')}: not the metrics of a finished "
                                        f"run ({type(e).__name__}: {e})") from None
    except OSError as e:  # each figure is written whole or not at all
        raise run_folder.RunFolderError(f"cannot write the figures into {run_dir}: {e.strerror}") from None
    for name in names:
        print(os.path.join(run_dir, name))


if __name__ == "__main__":
    sys.exit(main())
