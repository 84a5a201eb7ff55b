"""Training speed. Seed 1: the usual DataLoader pipeline against this repository's in-memory path.
Seed 2: the cost per training image of `ressenet` uncropped against its 22x22 crop, at batch 128 and 256.

    python benchmark.py                 # seed 1: 3 rounds of 2,000 steps (a third of an epoch) per variant
    python benchmark.py --steps 6000 --rounds 1
    python benchmark.py --recipe seed2 --rounds 7
    python benchmark.py --recipe small --rounds 7

Three variants train the seed-1 network (batch 10, Adam + OneCycleLR, clipping) from the same initial
weights on the same shuffled order, in one process, round-robin, so machine noise hits each alike:
  dataloader   torchvision MNIST + ToTensor + Normalize through a DataLoader (num_workers=1), torch defaults
  memory       the same math on the data held in memory as tensors: its weights must equal dataloader's bit for bit
  fast         what main.py runs: data in memory, fused Adam, and at this batch size oneDNN convolutions
               off and one thread (each measured faster here at batch 10: 12.2 s/epoch on 1 thread against
               15.4 s on 2, medians of 3 rounds in one run)
It prints the median ms per step, the implied seconds per 60,000-image epoch and the ratio to dataloader,
and a floor: the two convolutions and two max-pools alone, forward and backward, with fast's kernel settings.
No seed-1 step can be cheaper than that floor with torch's CPU kernels. On a 2-core AMD EPYC VM (AVX2,
torch 2.14.1) it measured 1.18 ms per step (7.1 s per epoch) here and 1.31-1.43 ms in three standalone
timings of kernel_floor, before the fully connected layers, loss, clipping, Adam and the scheduler are counted.

The seed-2 variants each train `ressenet` with the seed2 recipe's loop (augmentation, AdamW, OneCycleLR,
channels-last) on the same --images training images per round, round-robin. Each is named by its input
(the central crop), its widths (stem, 11x11 or 14x14 stage, 5x5 or 7x7 stage) and its batch size:
  28px 8-16-20 b128   the whole image at batch 128: the network and batch before the crop
  28px 8-16-20 b256   the same at batch 256
  22px 8-16-20 b256   the central 22x22: the recipe before its widths and batch changed
  22px 8-16-20 b512   the same at batch 512
  20px 8-16-20 b256   the central 20x20
  22px 8-16-16 b256   widths that are multiples of 16 after the stem (channels-last BatchNorm is fast there)
  22px 16-16-16 b256  all 16
  22px 8-16-16 b512   what the seed2 recipe runs
It prints the median microseconds per training image, the implied seconds per 50,000-image epoch and the
ratios to the first variant and to the recipe. --recipe small times `ressenet-small` and `ressenet-tiny`
(depthwise-separable, widths 16-24-32 and 16-20-24) against the full-convolution small network they replaced
(widths 8-12-12), all at batch 128.
"""
import argparse
import functools
import statistics
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import data_file
import main
import model_train
from model import build_model

VARIANTS = ("dataloader", "memory", "fast")
SEED2_VARIANTS = {f"{c}px {'-'.join(map(str, w))} b{b}": ("ressenet", dict(crop=c, widths=w), b)  # model, batch
                  for c, w, b in [(28, (8, 16, 20), 128), (28, (8, 16, 20), 256), (22, (8, 16, 20), 256),
                                  (22, (8, 16, 20), 512), (20, (8, 16, 20), 256), (22, (8, 16, 16), 256),
                                  (22, (16, 16, 16), 256), (22, (8, 16, 16), 512)]}
SEED2_RECIPE = "22px 8-16-16 b512"
# The small networks against the one they replaced, at the batch all train with (15 epochs, max-lr 0.01).
SMALL_VARIANTS = {"full 8-12-12": ("ressenet", dict(widths=(8, 12, 12), stem_pool_first=False, crop=28), 128),
                  "ressenet-small": ("ressenet-small", {}, 128), "ressenet-tiny": ("ressenet-tiny", {}, 128)}


def run(variant, steps, seed, data_dir, train, order):
    """Train `steps` batches from seed `seed` in `order`; return (seconds per step, final state_dict)."""
    recipe = argparse.Namespace(**main.RECIPES["seed1"])
    fast = variant == "fast"
    main.use_fast_cpu_kernels(fast, recipe.batch_size)
    torch.manual_seed(seed)
    model = build_model(recipe.model)
    optimizer, scheduler = main.make_optimizer(model, recipe, steps, fused=fast)
    torch.manual_seed(seed + 1)  # dropout masks: the same stream for every variant
    if variant == "dataloader":
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        dataset = datasets.MNIST(data_dir, train=True, transform=tf)
        # A fixed sampler gives the same order as the in-memory slices; the loader's own generator keeps
        # its worker seed off the global stream that dropout draws from.
        batches = DataLoader(dataset, batch_size=recipe.batch_size, sampler=order.tolist(), num_workers=1,
                             generator=torch.Generator())
    else:
        images, labels = train[0][order], train[1][order]
        batches = data_file.batches(images, labels, recipe.batch_size)
    metrics = model_train.train_one_epoch(model, optimizer, scheduler, batches, steps,
                                          clip_grad=recipe.clip_grad, progress=False)
    return metrics["seconds"] / steps, model.state_dict()


def kernel_floor(steps, seed):
    """Seconds per step of the seed-1 network's convolutions and max-pools alone, forward and backward."""
    recipe = argparse.Namespace(**main.RECIPES["seed1"])
    main.use_fast_cpu_kernels(True, recipe.batch_size)
    torch.manual_seed(seed)
    net = build_model(recipe.model)
    x = torch.randn(recipe.batch_size, 1, 28, 28)
    start = time.perf_counter()
    for _ in range(steps):
        net.zero_grad(set_to_none=True)  # fresh gradients each step, as in training (no accumulation)
        h = net.pool(net.conv2(net.pool(net.conv1(x))))  # no ReLU, dropout, FC, loss or optimizer
        h.backward(torch.ones_like(h))
    return (time.perf_counter() - start) / steps


def run_seed2(name, kwargs, batch_size, train, images, seed):
    """Train `build_model(name, **kwargs)` with the seed2 recipe's loop on the first `images` training images;
    return seconds per image."""
    recipe = argparse.Namespace(**{**main.RECIPES["seed2"], "batch_size": batch_size})
    main.use_fast_cpu_kernels(True, batch_size)
    torch.manual_seed(seed)
    model = build_model(name, **kwargs).to(memory_format=torch.channels_last)
    steps = images // batch_size
    optimizer, scheduler = main.make_optimizer(model, recipe, steps, fused=True)
    generator = torch.Generator().manual_seed(seed)
    augment = functools.partial(data_file.random_shift_rotate, generator=generator, max_shift=recipe.shift,
                                max_degrees=recipe.rotate)
    batches = data_file.batches(train[0][:steps * batch_size], train[1][:steps * batch_size], batch_size, generator)
    metrics = model_train.train_one_epoch(model, optimizer, scheduler, batches, steps, clip_grad=recipe.clip_grad,
                                          augment=augment, label_smoothing=recipe.label_smoothing, progress=False)
    return metrics["seconds"] / (steps * batch_size)


def benchmark_seed2(args, train, variants, recipe_variant):
    print(f"torch {torch.__version__}, {main.DEFAULT_THREADS} threads, {args.rounds} rounds of {args.images:,} "
          f"images")
    times = {v: [] for v in variants}
    # Untimed: no variant pays for the process's first convolutions.
    run_seed2(*variants[recipe_variant], train, 2560, args.seed)
    for r in range(args.rounds):
        for v, config in variants.items():
            times[v].append(run_seed2(*config, train, args.images, args.seed))
            print(f"round {r + 1} {v:<18} {1e6 * times[v][-1]:6.1f} us/image", flush=True)
    first, recipe = statistics.median(next(iter(times.values()))), statistics.median(times[recipe_variant])
    print(f"\n{'variant':<18} {'us/image':>8} {'s/epoch':>8} {'time':>6} {'vs recipe':>9}")
    for v in variants:
        t = statistics.median(times[v])
        print(f"{v:<18} {1e6 * t:8.1f} {50_000 * t:8.1f} {t / first:5.2f}x {t / recipe:8.2f}x")


def benchmark():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=("seed1", "seed2", "small"), default="seed1",
                   help="which recipe's variants to time; small: the seed-2 small networks")
    p.add_argument("--steps", type=main.positive_int, default=2000,
                   help="seed 1: training steps per variant and round")
    p.add_argument("--images", type=main.positive_int, default=15_360,
                   help="seed 2: training images per variant and round")
    p.add_argument("--rounds", type=main.positive_int, default=3, help="rounds; the median is reported")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (fetched if missing)")
    args = p.parse_args()
    try:
        train = data_file.load_mnist(args.data_dir)["train"]
    except data_file.DataError as e:
        p.exit(1, f"error: {e}\n")
    if args.recipe == "seed2":
        return benchmark_seed2(args, train, SEED2_VARIANTS, SEED2_RECIPE)
    if args.recipe == "small":
        return benchmark_seed2(args, train, SMALL_VARIANTS, "ressenet-small")
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(args.seed))
    order = order[:args.steps * main.RECIPES["seed1"]["batch_size"]]
    print(f"torch {torch.__version__}, {main.DEFAULT_THREADS} threads, {args.rounds} rounds of {args.steps} steps")
    times = {v: [] for v in VARIANTS + ("floor",)}
    for r in range(args.rounds):
        states = {}
        for v in VARIANTS:
            t, states[v] = run(v, args.steps, args.seed, args.data_dir, train, order)
            times[v].append(t)
            print(f"round {r + 1} {v:<10} {1e3 * t:6.3f} ms/step", flush=True)
        same = all(torch.equal(states["dataloader"][k], states["memory"][k]) for k in states["memory"])
        print(f"round {r + 1} memory weights identical to dataloader's: {same}")
        times["floor"].append(kernel_floor(args.steps, args.seed))
        print(f"round {r + 1} {'floor':<10} {1e3 * times['floor'][-1]:6.3f} ms/step", flush=True)
    base = statistics.median(times["dataloader"])
    print(f"\n{'variant':<10} {'ms/step':>8} {'s/epoch':>8} {'speed-up':>8}")
    for v in VARIANTS + ("floor",):
        t = statistics.median(times[v])
        print(f"{v:<10} {1e3 * t:8.3f} {6000 * t:8.1f} {base / t:7.2f}x")


if __name__ == "__main__":
    benchmark()
