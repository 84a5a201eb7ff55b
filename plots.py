"""Figures for a run folder, drawn from its metrics.json: training curves, the test confusion matrix and the
test digits the model got most confidently wrong.

    python plots.py runs/seed1-seed1            # (re)draw curves.png, confusion.png, mistakes.png there

main.py calls save_plots after every run it saves.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from torchvision.datasets import MNIST  # noqa: E402


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
    val = [(e["epoch"] * e["steps"], e["val_acc"]) for e in metrics["epochs"] if "val_acc" in e]
    if val:
        axes[1].plot(*zip(*val), "o-", label="validation accuracy")
    axes[1].axhline(metrics["test_acc"], color="k", ls=":", label=f"test accuracy {metrics['test_acc']:.2f}%")
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
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"test set: {metrics['test_acc']:.2f}% correct")
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


def save_plots(run_dir, metrics, data_dir, write):
    """Draw the three figures into run_dir; `write(path, fn)` writes a file atomically (main.atomic_write)."""
    test_images = MNIST(data_dir, train=False).data
    figures = {"curves.png": plot_curves(metrics), "confusion.png": plot_confusion(metrics),
               "mistakes.png": plot_mistakes(metrics, test_images)}
    for name, fig in figures.items():
        write(os.path.join(run_dir, name), lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
    return list(figures)


if __name__ == "__main__":
    import main

    p = argparse.ArgumentParser(description="Draw a run folder's figures from its metrics.json.")
    p.add_argument("run_dir", help="a folder with metrics.json, written by main.py")
    args = p.parse_args()
    with open(os.path.join(args.run_dir, "metrics.json")) as f:
        run = json.load(f)
    for name in save_plots(args.run_dir, run, run["config"]["data_dir"], main.atomic_write):
        print(os.path.join(args.run_dir, name))
