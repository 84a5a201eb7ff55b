"""Training speed, measured as ratios in one process (variants run round-robin so machine noise hits each alike),
and the check of a GPU: the suite, bit for bit, and the race there.

    python benchmark.py                          # net-1epoch's loop: DataLoader pipeline against in-memory paths
    python benchmark.py --suite ressenet --rounds 7
    python benchmark.py --suite small --rounds 7
    python benchmark.py --suite one-epoch --rounds 5
    python benchmark.py --suite race               # one epoch against the public 99%-in-one-epoch recipe
    python benchmark.py --suite race --device cuda # the same on a GPU, synchronised
    python benchmark.py --suite gpu                # on a GPU: the tests, bit for bit twice and resumed, the race
    python benchmark.py --suite inference          # torch, onnxruntime float and int8: latency and throughput
    python benchmark.py --suite numbers            # ms to read a 6-digit number, the shipped readers, torch and ORT

--suite pipeline trains the net-1epoch recipe (batch 10, Adam + OneCycleLR, clipping) three ways from the same
initial weights on the same shuffled order:
  dataloader   torchvision MNIST + ToTensor + Normalize through a DataLoader (num_workers=1), torch defaults
  memory       the same math on the data held in memory as tensors: its weights must equal dataloader's bit for bit
  fast         what main.py runs: data in memory, fused Adam, and at this batch size oneDNN convolutions off
               and one thread (each measured faster at batch 10 on 2 cores)
and a floor: the two convolutions and two max-pools alone, forward and backward, with fast's kernel settings.
It prints the median ms per step, the implied seconds per 60,000-image epoch and the ratio to dataloader.

--suite ressenet and --suite small train networks with the ressenet-8epoch recipe's loop (augmentation, AdamW,
OneCycleLR, channels-last) on the same --images training images per round, and print the median microseconds
per training image and the ratios. ressenet: the 22x22 crop, widths and batch sizes the recipe was chosen
among, named "<crop>px <widths> b<batch>"; small: ressenet-small and ressenet-tiny against the full-convolution
small network they replaced. --suite one-epoch times the two one-epoch recipes' loops, ressenet-wide-1epoch
against net-1epoch (batch 10, the fast path), per training image. The figures and what was decided from them:
docs/experiments.md.

--suite race trains whole one-epoch runs on all 60,000 in-memory images, seeds 1-3 (--seeds), round-robin
in one process: the best-known public "99% in one epoch" recipe (PUBLIC_RECIPE on model.CNN215k, its own
loop as published) against our recipes (--recipes, through model_train.train). It prints each run's seconds
(network built, one epoch trained; data loading and test scoring excluded for every variant alike) and test
accuracy, then per variant the median seconds, their ratio to the public recipe's, and the test accuracies.

--suite gpu (<= 8 minutes on one GPU, MNIST in ./data/MNIST/raw) runs `pytest -m "not browser"` with the GPU
visible; trains ressenet-8epoch twice from seed 1 on CUDA and compares the two bit for bit (metrics and weights);
interrupts a third run after its first epoch (its resume.pt written and read back) and compares the resumed run
with the first; then runs the race on CUDA, seeds 1-3. It prints one line per check and ends with PASS or FAIL.

--suite inference builds the network of each recipe in the README's table (its weights do not change its
speed), exports it as `main.py export` does (ONNX, and int8 calibrated on training digits), and times three
ways of running it round-robin in one process: torch eager as `predict` runs it, onnxruntime float and
onnxruntime int8, each at batch 1 (median microseconds per digit) and batch 1,000 (digits per second), with the
ratios to torch.

--suite numbers reads 6-digit numbers of test digits (0-8 px apart) from their PNG files through predict's whole
path (digit_image.read_number) with the shipped readers, their networks run by torch and by onnxruntime (float,
as `export` writes them), round-robin in one process: median milliseconds per number.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import augment
import data_file
import model_train
import reader
import recipes
from errors import exit_status
from model import build_model

CPU = torch.device("cpu")

VARIANTS = ("dataloader", "memory", "fast")
POSITIVE_INT = recipes.flag_type(int, "positive")
def ressenet_loop(model="ressenet", batch_size=512, **model_kwargs):
    """(config, model_kwargs) of the ressenet-8epoch recipe's loop with another network or batch size."""
    return recipes.recipe_config("ressenet-8epoch", model=model, batch_size=batch_size), model_kwargs


SEED2_VARIANTS = {f"{c}px {'-'.join(map(str, w))} b{b}": ressenet_loop(batch_size=b, crop=c, widths=w)
                  for c, w, b in [(28, (8, 16, 20), 128), (28, (8, 16, 20), 256), (22, (8, 16, 20), 256),
                                  (22, (8, 16, 20), 512), (20, (8, 16, 20), 256), (22, (8, 16, 16), 256),
                                  (22, (16, 16, 16), 256), (22, (8, 16, 16), 512)]}
SEED2_RECIPE = "22px 8-16-16 b512"  # what ressenet-8epoch runs
# The small networks against the one they replaced, at the batch all train with (15 epochs, max-lr 0.01).
SMALL_VARIANTS = {"full 8-12-12": ressenet_loop(batch_size=128, widths=(8, 12, 12), stem_pool_first=False, crop=28),
                  "ressenet-small": ressenet_loop("ressenet-small", 128),
                  "ressenet-tiny": ressenet_loop("ressenet-tiny", 128)}
ONE_EPOCH_VARIANTS = {r: (recipes.recipe_config(r), {}) for r in ("net-1epoch", "ressenet-wide-1epoch")}


def run(variant, steps, seed, data_dir, train, order):
    """Train `steps` batches from seed `seed` in `order`; return (seconds per step, final state_dict)."""
    fast = variant == "fast"
    recipe = recipes.recipe_config("net-1epoch", kernels="fast" if fast else "exact")
    with model_train.kernels(recipe, CPU):
        torch.manual_seed(seed)
        model = build_model(recipe.model)
        optimizer, scheduler = model_train.make_optimizer(model, recipe, steps, fused=fast)
        torch.manual_seed(seed + 1)  # dropout masks: the same stream for every variant
        if variant == "dataloader":
            from torchvision import datasets, transforms  # only this variant: the others read data_file's tensors
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
    """Seconds per step of net-1epoch's network's convolutions and max-pools alone, forward and backward."""
    recipe = recipes.recipe_config("net-1epoch")
    with model_train.kernels(recipe, CPU):
        torch.manual_seed(seed)
        net = build_model(recipe.model)
        x = torch.randn(recipe.batch_size, 1, 28, 28)
        start = time.perf_counter()
        for _ in range(steps):
            net.zero_grad(set_to_none=True)  # fresh gradients each step, as in training (no accumulation)
            h = net.pool(net.conv2(net.pool(net.conv1(x))))  # no ReLU, dropout, FC, loss or optimizer
            h.backward(torch.ones_like(h))
        return (time.perf_counter() - start) / steps


def time_recipe(config, model_kwargs, train, images):
    """Seconds per training image of `config`'s training loop (kernel choice, memory layout, optimizer and
    schedule, augmentation) on the first `images` training images, from seed config.seed."""
    with model_train.kernels(config, CPU):
        torch.manual_seed(config.seed)
        model = model_train.build_for(config, torch.device("cpu"), **model_kwargs)
        steps = images // config.batch_size
        optimizer, scheduler = model_train.make_optimizer(model, config, steps, fused=True)
        generator = torch.Generator().manual_seed(config.seed)
        n = steps * config.batch_size
        batches = data_file.batches(train[0][:n], train[1][:n], config.batch_size, generator)
        metrics = model_train.train_one_epoch(model, optimizer, scheduler, batches, steps, clip_grad=config.clip_grad,
                                              augment=augment.augmentation(config, generator),
                                              label_smoothing=config.label_smoothing, progress=False)
        return metrics["seconds"] / n


def benchmark_recipes(args, train, variants, recipe_variant, epoch_images=50_000):
    """Time each of `variants`, {name: (config, model_kwargs)}, round-robin; ratios to the first and to one."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of {args.images:,} "
          f"images")
    times = {v: [] for v in variants}
    # Untimed: no variant pays for the process's first convolutions.
    time_recipe(*variants[recipe_variant], train, 2560)
    for r in range(args.rounds):
        for v, (config, kwargs) in variants.items():
            times[v].append(time_recipe(config, kwargs, train, args.images))
            print(f"round {r + 1} {v:<22} {1e6 * times[v][-1]:6.1f} us/image", flush=True)
    first, recipe = statistics.median(next(iter(times.values()))), statistics.median(times[recipe_variant])
    w = max(18, *map(len, variants))
    print(f"\n{'variant':<{w}} {'us/image':>8} {'s/epoch':>8} {'time':>6} {'vs recipe':>9}")
    for v in variants:
        t = statistics.median(times[v])
        print(f"{v:<{w}} {1e6 * t:8.1f} {epoch_images * t:8.1f} {t / first:5.2f}x {t / recipe:8.2f}x")


# The public recipe as published: Adam (betas 0.7, 0.9) with OneCycleLR to 0.01 and no momentum cycling,
# stepped every batch; batch 256; one epoch; normalised images held in memory, shuffled; no augmentation.
PUBLIC_RECIPE = dict(model="cnn-215k", batch_size=256, max_lr=0.01, betas=(0.7, 0.9))
RACE_RECIPES = ("ressenet-wide22-b128-1epoch", "ressenet-wide-1epoch", "net-1epoch")


def synchronised(device):
    """time.perf_counter once the device has finished what it was given (a GPU runs behind the host)."""
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize()
    return time.perf_counter()


def public_one_epoch(data, seed, device=CPU):
    """(seconds, test accuracy) of one epoch of PUBLIC_RECIPE, with torch's default kernels and layout."""
    with model_train.kernels(recipes.Config(model="cnn-215k", batch_size=PUBLIC_RECIPE["batch_size"]), device):
        torch.manual_seed(seed)
        (x, y), batch = data["train"], PUBLIC_RECIPE["batch_size"]
        start = synchronised(device)
        model = build_model(PUBLIC_RECIPE["model"]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), PUBLIC_RECIPE["max_lr"], betas=PUBLIC_RECIPE["betas"])
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, PUBLIC_RECIPE["max_lr"], cycle_momentum=False,
                                                        total_steps=data_file.num_batches(len(y), batch))
        model.train()
        for xb, yb in data_file.batches(x, y, batch, torch.Generator().manual_seed(seed)):
            loss = F.nll_loss(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        seconds = synchronised(device) - start
        return seconds, model_train.measure(model, *data["test"])["acc"]


def recipe_one_epoch(recipe, data, seed, device=CPU):
    """(seconds of its training loop, test accuracy) of one of our recipes, as main.py trains it (its last step
    reads the accuracy back, so a GPU's seconds include all its work)."""
    config = recipes.recipe_config(recipe, seed=seed)
    _, metrics = model_train.train(config, log=lambda *a: None, data=data, progress=False, device=device.type)
    return metrics["train_seconds"], metrics["test_acc"]


def race(args):
    device = model_train.pick_device(args.device)
    data_file.ensure_mnist(args.data_dir)
    start = synchronised(device)
    data = data_file.load_mnist(args.data_dir, device=device)
    loading = synchronised(device) - start
    variants = {"public cnn-215k b256": lambda seed: public_one_epoch(data, seed, device),
                **{r: (lambda seed, r=r: recipe_one_epoch(r, data, seed, device)) for r in args.recipes}}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({where}), seeds {args.seeds}, one epoch of "
          f"{len(data['train'][1]):,} images each; loading the data onto the device took {loading:.2f} s "
          f"(excluded below; add it once for a run's wall time)")
    warm = {"train": tuple(t[:2560] for t in data["train"]), "val": None, "test": data["test"]}
    public_one_epoch(warm, 0, device)  # untimed warm-ups: no variant pays for the first kernels
    for r in args.recipes:
        recipe_one_epoch(r, warm, 0, device)
    results = {v: [] for v in variants}
    w = max(map(len, variants))
    for seed in args.seeds:
        for v, run_variant in variants.items():
            results[v].append(run_variant(seed))
            print(f"seed {seed} {v:<{w}} {results[v][-1][0]:6.2f} s  test {results[v][-1][1]:.2f}%", flush=True)
    public = statistics.median(s for s, _ in results["public cnn-215k b256"])
    print(f"\n{'variant':<{w}} {'seconds':>8} {'vs public':>9}  test accuracy per seed (mean)")
    for v, runs in results.items():
        t, accs = statistics.median(s for s, _ in runs), [a for _, a in runs]
        print(f"{v:<{w}} {t:8.2f} {t / public:8.2f}x  {' / '.join(f'{a:.2f}' for a in accs)} "
              f"({statistics.mean(accs):.2f})")


def benchmark(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=("pipeline", "ressenet", "small", "one-epoch", "race", "inference", "numbers",
                                       "gpu"),
                   default="pipeline",
                   help="which variants to time (see the top of this file)")
    p.add_argument("--steps", type=POSITIVE_INT, default=2000,
                   help="pipeline: training steps per variant and round")
    p.add_argument("--images", type=POSITIVE_INT, default=15_360,
                   help="ressenet, small, one-epoch: training images per variant and round")
    p.add_argument("--rounds", type=POSITIVE_INT, default=3, help="rounds; the median is reported")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="race: the seeds each variant runs")
    p.add_argument("--recipes", nargs="+", choices=sorted(recipes.RECIPES), default=list(RACE_RECIPES),
                   help="race: our one-epoch recipes against the public one")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (fetched if missing)")
    p.add_argument("--device", choices=recipes.DEVICES, default="cpu",
                   help="race: where to train (auto: torch's current accelerator, else the CPU)")
    args = p.parse_args(argv)
    return exit_status(lambda: run_suite(args))


def run_suite(args):
    """The suite args.suite asks for; its exit status (the gpu check's PASS or FAIL)."""
    if args.suite == "gpu":
        return gpu_check(args)
    if args.suite == "race":
        return race(args)
    if args.suite == "inference":
        return benchmark_inference(args)
    if args.suite == "numbers":
        return benchmark_numbers(args)
    train = data_file.load_mnist(args.data_dir)["train"]
    if args.suite == "ressenet":
        benchmark_recipes(args, train, SEED2_VARIANTS, SEED2_RECIPE)
    elif args.suite == "small":
        benchmark_recipes(args, train, SMALL_VARIANTS, "ressenet-small")
    elif args.suite == "one-epoch":
        benchmark_recipes(args, train, ONE_EPOCH_VARIANTS, "net-1epoch", epoch_images=data_file.TRAIN_SIZE)
    else:
        benchmark_pipeline(args, train)


INFERENCE_RECIPES = ("net-1epoch", "ressenet-8epoch", "ressenet-wide-1epoch", "ressenet-wide22-b128-1epoch",
                     "ressenet-micro-clean-40epoch", "shared-nano-clean-40epoch")  # one per network of the table


def benchmark_inference(args):
    import tempfile

    import export
    import onnx_model
    data = data_file.load_mnist(args.data_dir)
    test = data["test"][0]
    single, batch = test[:200], test[:1000]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds; batch 1: "
          f"us per digit over {len(single)} digits one at a time; batch 1,000: digits per second")
    print(f"{'recipe':<30} {'network':<16} {'way':<10} {'batch 1':>10} {'ratio':>7} {'batch 1,000':>12} {'ratio':>7}")
    for recipe in INFERENCE_RECIPES:
        config = recipes.recipe_config(recipe)
        torch.manual_seed(args.seed)
        model = reader.as_predict_runs(build_model(config.model))
        with tempfile.TemporaryDirectory() as tmp:
            float_path = f"{tmp}/model.onnx"
            with open(float_path, "wb") as f:
                f.write(export.onnx_bytes(model, {}))
            with open(f"{tmp}/model.int8.onnx", "wb") as f:
                f.write(export.int8_bytes(float_path, data["train"][0][:export.CALIBRATION].numpy()))
            runners = {"torch": lambda x: model(x), "onnx": onnx_model.OnnxModel(float_path).log_probs,
                       "onnx int8": onnx_model.OnnxModel(f"{tmp}/model.int8.onnx").log_probs}
            inputs = {"torch": (list(single[:, None].unbind(0)), batch)}
            inputs["onnx"] = inputs["onnx int8"] = ([x.numpy() for x in inputs["torch"][0]], batch.numpy())
            times = {name: ([], []) for name in runners}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, run in runners.items():
                        ones, whole = inputs[name]
                        start = time.perf_counter()
                        for x in ones:
                            run(x)
                        times[name][0].append((time.perf_counter() - start) / len(ones))
                        start = time.perf_counter()
                        run(whole)
                        times[name][1].append(len(whole) / (time.perf_counter() - start))
        one = {name: statistics.median(t[0]) for name, t in times.items()}
        many = {name: statistics.median(t[1]) for name, t in times.items()}
        for name in runners:
            print(f"{recipe:<30} {config.model:<16} {name:<10} {1e6 * one[name]:>8.0f}us {one['torch'] / one[name]:>6.2f}x "
                  f"{many[name]:>12,.0f} {many[name] / many['torch']:>6.2f}x")


def benchmark_numbers(args):
    import io
    import json
    import tempfile

    import composed_numbers
    import digit_image
    import export
    import onnx_model
    import run_folder
    _, model, checkpoint = run_folder.load_named_checkpoint(run_folder.SHIPPED)
    _, rows_model, _ = run_folder.load_row_reader(run_folder.SHIPPED_ROWS)
    images, labels = (t.numpy() for t in data_file.read_split(args.data_dir, "test"))
    pngs = [composed_numbers.png(page) for page, written, _ in composed_numbers.compose(images, labels, 300, seed=9)
            if len(written) == 6][:40]
    with tempfile.TemporaryDirectory() as tmp:
        for name, network, rows in (("model.onnx", model, False), ("rows.onnx", rows_model, True)):
            with open(f"{tmp}/{name}", "wb") as f:
                f.write(export.onnx_bytes(reader.as_predict_runs(network), {"config": json.dumps(checkpoint["config"])},
                                          rows=rows))
        digits, row_reader = onnx_model.OnnxModel(f"{tmp}/model.onnx"), onnx_model.OnnxRows(f"{tmp}/rows.onnx")
        ways = {"torch": (reader.digit_reader(model, checkpoint), reader.row_reader(rows_model)),
                "onnxruntime": (digits.probabilities, row_reader.row_frames)}
        times = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, (probabilities, rows) in ways.items():
                start = time.perf_counter()
                for png in pngs:
                    digit_image.read_number(io.BytesIO(png), probabilities, rows)
                times[name].append((time.perf_counter() - start) / len(pngs))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(pngs)} numbers of 6 test digits, "
          f"median of {args.rounds} rounds, the shipped readers{' with TTA' if digits.tta else ''}")
    for name, t in times.items():
        print(f"{name:<12} {1e3 * statistics.median(t):6.1f} ms a number")


def benchmark_pipeline(args, train):
    batch_size = recipes.recipe_config("net-1epoch").batch_size
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(args.seed))
    order = order[:args.steps * batch_size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.steps} steps")
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



def gpu_check(args):
    """--suite gpu: every check of the CUDA path in one run; returns 0 when all pass."""
    import dataclasses
    import subprocess
    import tempfile
    import run_folder
    device = model_train.pick_device("cuda")  # a one-line error where there is none
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}", flush=True)
    passed = {}
    start = time.perf_counter()
    suite = subprocess.run([sys.executable, "-m", "pytest", "-m", "not browser", "-q", "-p", "no:randomly"],
                           capture_output=True, text=True, timeout=420)
    passed["pytest"] = suite.returncode == 0
    print(f"pytest -m 'not browser' on {device}: {suite.stdout.strip().splitlines()[-1]} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not passed["pytest"]:
        print("\n".join(suite.stdout.splitlines()[-40:]))
    config = recipes.recipe_config("ressenet-8epoch", seed=1, data_dir=args.data_dir)
    data = data_file.load_mnist(args.data_dir, val_size=config.val_size, split_seed=config.seed, device=device)
    quiet = lambda *a: None  # noqa: E731
    same = lambda a, b: (all(torch.equal(v, b[0].state_dict()[k]) for k, v in a[0].state_dict().items()) and
                         model_train.without_timings(a[1]) == model_train.without_timings(b[1]))
    first = model_train.train(config, log=quiet, data=data, progress=False, device="cuda")
    second = model_train.train(config, log=quiet, data=data, progress=False, device="cuda")
    passed["bit for bit"] = same(first, second)
    print(f"{config.recipe} twice from seed 1: test {first[1]['test_acc']:.2f}% / {second[1]['test_acc']:.2f}%, "
          f"bit for bit: {passed['bit for bit']}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        def stop(state):
            run_folder.save_resume(folder, dataclasses.asdict(config), config.model, state, config.data_dir)
            raise KeyboardInterrupt
        try:
            model_train.train(config, log=quiet, data=data, progress=False, on_epoch=stop, device="cuda")
        except KeyboardInterrupt:
            pass
        state = run_folder.load_resume(folder)["state"]
    resumed = model_train.train(config, log=quiet, data=data, progress=False, resume=state, device="cuda")
    passed["resumed"] = same(first, resumed)
    print(f"interrupted after epoch 1, resume.pt written and read, resumed: bit for bit: {passed['resumed']}",
          flush=True)
    args.device = "cuda"
    race(args)
    print("PASS" if all(passed.values()) else f"FAIL: {', '.join(k for k, v in passed.items() if not v)}")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(benchmark())
