"""Training speed, measured as ratios in one process (variants run round-robin so machine noise hits each alike),
and the server under load.

    python benchmark.py                          # the seed-1 loop: DataLoader pipeline against in-memory paths
    python benchmark.py --suite ressenet --rounds 7
    python benchmark.py --suite small --rounds 7
    python benchmark.py --suite one-epoch --rounds 5
    python benchmark.py --suite race               # one epoch against the public 99%-in-one-epoch recipe
    python benchmark.py --suite serve              # python main.py serve, under load and hostile clients
    python benchmark.py --suite inference          # torch, onnxruntime float and int8: latency and throughput

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

--suite serve starts `python main.py serve` (--checkpoint, default the newest run) in a process of its own and
measures it from outside: 128 simultaneous POSTs of real test digits against the same digits sent one by one,
the peak memory (VmHWM) above idle while 64 simultaneous 4096x4096 uploads are read, the slowest of 10 normal
requests made while 200 slow clients hold connections open and how long any of those outlives its deadline, a
hostile set (malformed request lines, headers, lengths; clients that reset or leave early) with the tracebacks
counted on the server's stderr, and how long Ctrl-C takes to stop it.

--suite inference builds the network of each recipe in the README's table (its weights do not change its
speed), exports it as `main.py export` does (ONNX, and int8 calibrated on training digits), and times three
ways of running it round-robin in one process: torch eager as `predict` runs it, onnxruntime float and
onnxruntime int8, each at batch 1 (median microseconds per digit) and batch 1,000 (digits per second), with the
ratios to torch.
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
from errors import UserError
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
    recipe = recipes.recipe_config("net-1epoch", exact=not fast)
    with model_train.cpu_kernels(recipe, CPU):
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
    """Seconds per step of the seed-1 network's convolutions and max-pools alone, forward and backward."""
    recipe = recipes.recipe_config("net-1epoch")
    with model_train.cpu_kernels(recipe, CPU):
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
    with model_train.cpu_kernels(config, CPU):
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


def public_one_epoch(data, seed):
    """(seconds, test accuracy) of one epoch of PUBLIC_RECIPE, with torch's default CPU kernels and layout."""
    with model_train.cpu_kernels(recipes.Config(model="cnn-215k", batch_size=PUBLIC_RECIPE["batch_size"]), CPU):
        torch.manual_seed(seed)
        (x, y), batch = data["train"], PUBLIC_RECIPE["batch_size"]
        start = time.perf_counter()
        model = build_model(PUBLIC_RECIPE["model"])
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
        seconds = time.perf_counter() - start
        return seconds, model_train.measure(model, *data["test"])["acc"]


def recipe_one_epoch(recipe, data, seed):
    """(seconds of its training loop, test accuracy) of one of our recipes, as main.py trains it."""
    config = recipes.recipe_config(recipe, seed=seed, device="cpu")
    _, metrics = model_train.train(config, log=lambda *a: None, data=data, progress=False)
    return metrics["train_seconds"], metrics["test_acc"]


def race(args):
    data = data_file.load_mnist(args.data_dir)
    variants = {"public cnn-215k b256": lambda seed: public_one_epoch(data, seed),
                **{r: (lambda seed, r=r: recipe_one_epoch(r, data, seed)) for r in args.recipes}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {args.seeds}, one epoch of "
          f"{len(data['train'][1]):,} images each")
    public_one_epoch({"train": tuple(t[:2560] for t in data["train"]), "test": data["test"]}, 0)  # untimed warm-up
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
    p.add_argument("--suite", choices=("pipeline", "ressenet", "small", "one-epoch", "race", "serve", "inference"),
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
    p.add_argument("--checkpoint", help="serve: the checkpoint served (default: the newest runs/*/model.pt)")
    args = p.parse_args(argv)
    try:
        if args.suite == "serve":
            return benchmark_serve(args)
        if args.suite == "race":
            race(args)
            return 0
        if args.suite == "inference":
            benchmark_inference(args)
            return 0
        train = data_file.load_mnist(args.data_dir)["train"]
        if args.suite == "ressenet":
            benchmark_recipes(args, train, SEED2_VARIANTS, SEED2_RECIPE)
        elif args.suite == "small":
            benchmark_recipes(args, train, SMALL_VARIANTS, "ressenet-small")
        elif args.suite == "one-epoch":
            benchmark_recipes(args, train, ONE_EPOCH_VARIANTS, "net-1epoch", epoch_images=data_file.TRAIN_SIZE)
        else:
            benchmark_pipeline(args, train)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


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



def serve_process(checkpoint):
    """`python main.py serve` on a free port in a process of its own: (process, port)."""
    import subprocess
    flags = ["--checkpoint", checkpoint] if checkpoint else []
    proc = subprocess.Popen([sys.executable, "main.py", "serve", "--port", "0", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("open http://"):
            return proc, int(line.split(":")[2].split("/")[0])
    raise data_file.DataError(f"the server did not start: {proc.stderr.read().strip()}")


def memory_kb(pid, field):
    """VmRSS (now) or VmHWM (the peak) of a process, in kB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def benchmark_serve(args):
    import http.client
    import io
    import json
    import signal
    import socket
    import struct
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def post(body, barrier=None):
        if barrier is not None:
            barrier.wait()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        answer = (response.status, json.loads(response.read()))
        connection.close()
        return answer

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    data_file.ensure_mnist(args.data_dir)
    images = data_file.read_split(args.data_dir, "test")[0][:16]
    digits = [png(Image.fromarray(255 - a.numpy()).resize((280, 280), Image.BILINEAR)) for a in images]
    proc, port = serve_process(args.checkpoint)
    try:
        idle = memory_kb(proc.pid, "VmRSS")
        alone = [post(body) for body in digits]
        barrier = threading.Barrier(128)
        with ThreadPoolExecutor(128) as pool:
            burst = list(pool.map(lambda i: post(digits[i % 16], barrier), range(128)))
        same = sum(answer == alone[i % 16] for i, answer in enumerate(burst))
        print(f"128 simultaneous POSTs: {sum(s == 200 for s, _ in burst)} answered 200, {same} identical to the "
              f"same digit sent alone")

        large = png(Image.fromarray(255 - images[0].numpy()).resize((4096, 4096), Image.BILINEAR))
        barrier = threading.Barrier(64)
        with ThreadPoolExecutor(64) as pool:
            big = list(pool.map(lambda i: post(large, barrier), range(64)))
        peak = memory_kb(proc.pid, "VmHWM")
        print(f"64 simultaneous 4096x4096 uploads ({len(large):,} bytes each): {sum(s == 200 for s, _ in big)} "
              f"answered 200; peak memory {peak / 1024:.0f} MB, {(peak - idle) / 1024:.0f} MB above idle "
              f"({idle / 1024:.0f} MB)")

        slow = []
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" if i % 2 else
                      b"POST /predict HTTP/1.1\r\nHo")  # half stall in the body, half in the headers
            slow.append((s, time.monotonic()))
        latencies = []
        for body in digits[:10]:
            start = time.monotonic()
            post(body)
            latencies.append(time.monotonic() - start)
        held = []
        for s, opened in slow:
            s.recv(4096)  # returns when the server cuts the connection off (an answer, then EOF)
            held.append(time.monotonic() - opened)
            s.close()
        print(f"200 slow clients: the slowest of 10 normal requests beside them {1000 * max(latencies):.0f} ms; "
              f"each slow client cut off after {min(held):.1f}-{max(held):.1f} s (the deadline: 10 s)")

        hostile = [b"NONSENSE\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
                   b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"GET / HTTP/2.0\r\n\r\n",
                   b"POST /predict HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n",
                   b"POST /predict HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"\x00\xff" * 100 + b"\r\n\r\n",
                   b"DELETE / HTTP/1.1\r\n\r\n", b"GET /../main.py HTTP/1.1\r\n\r\n"]
        head = b"POST /predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(digits[0])
        answered = 0
        for i in range(40):
            for request in hostile:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(request)
                    answered += s.makefile("rb").readline().startswith(b"HTTP/1.0 ")
            for cut in (len(digits[0]) // 2, len(digits[0])):  # reset mid-body, and gone before the answer
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(head + digits[0][:cut])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        print(f"hostile set: {40 * len(hostile)} malformed requests, {answered} answered with a status line; "
              f"80 clients reset mid-request or gone before the answer")
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        err = proc.stderr.read()
        print(f"Ctrl-C: stopped in {time.monotonic() - start:.2f} s, exit status {proc.returncode}; tracebacks on "
              f"the server's stderr over the whole run: {err.count('Traceback')}")
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(benchmark())
