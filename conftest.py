"""What the tests share: the real MNIST data, the trained runs every test that needs one reuses, a server on a free
port, a headless Chromium, and the helpers that write images and speak to the command line and the server.

MNIST is fetched once into $MNIST_DATA_DIR (default ./data, the folder main.py uses) and only read after that;
everything a test writes goes under its own tmp_path.
"""
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import data_file
import digit_image
import model_train
import reader
import recipes
import row_train
import run_folder

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.environ.get("MNIST_DATA_DIR", os.path.join(HERE, "data"))


def quiet(*parts):
    """A log callback that prints nothing."""


def run_cli(*args, script="main.py", cwd=HERE, timeout=600):
    """Run a script of this repository (main.py by default) in a fresh interpreter, as a user would; return the
    CompletedProcess. For what a fresh process proves (Ctrl-C, imports, exit status); the rest runs in_process."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def in_process(main_function, argv, capsys):
    """main_function(argv) run in this process, reported as a finished subprocess would be: the CLI's own entry
    point without the ~3 s a fresh interpreter spends importing torch. An argparse exit counts as its status."""
    try:
        code = main_function(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def one_line_error(r, code=1):
    return r.returncode == code and r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1 \
        and "Traceback" not in r.stderr


@pytest.fixture(scope="session", autouse=True)
def shared_mnist_left_intact():
    """The real MNIST files are shared by every test: fetch them once, and fail the run if any test changed them."""
    data_file.ensure_mnist(DATA_DIR, log=quiet)
    yield
    assert data_file.bad_files(data_file.raw_dir(DATA_DIR)) == {}, "a test changed the shared MNIST files"


@pytest.fixture(scope="session")
def mnist():
    return data_file.load_mnist(DATA_DIR, log=quiet)


@pytest.fixture(scope="session")
def test_digits():
    """The MNIST test set as it is on disk: uint8 images (10000, 28, 28) and labels."""
    return data_file.read_split(DATA_DIR, "test")


def shipped_row_reader():
    """The shipped row reader (models/rows.pt) as read_digits' row_frames: loaded once, trained by no test."""
    global _ROWS
    if _ROWS is None:
        _ROWS = reader.row_reader(run_folder.load_row_reader(run_folder.SHIPPED_ROWS)[1])
    return _ROWS


_ROWS = None


@pytest.fixture(scope="session")
def rows():
    return shipped_row_reader()


def train_recipe(recipe, device="auto", dry_run=False, **overrides):
    """(config, model, metrics) of a recipe trained as main.py trains it (row_train.trainer)."""
    config = recipes.recipe_config(recipe, data_dir=DATA_DIR, **overrides)
    return config, *row_train.trainer(config)(config, log=quiet, progress=False, device=device, dry_run=dry_run)


def small_split(mnist, n_train=1536, n_val=512):
    """A few real training images with a validation split, for multi-epoch runs that take seconds."""
    (x, y), (xt, yt) = mnist["train"], mnist["test"]
    return {"train": (x[:n_train], y[:n_train]), "val": (x[-n_val:], y[-n_val:]), "test": (xt[:1000], yt[:1000])}


def save_run(out, config, model, metrics):
    """What main.py writes into a run folder: model.pt, the plots and metrics.json."""
    import plots
    plots.save_plots(str(out), metrics, config.data_dir)
    run_folder.save(str(out), dataclasses.asdict(config), model, metrics)


@pytest.fixture(scope="session")
def net_1epoch_run(mnist):
    """The net-1epoch recipe exactly as `python main.py` runs it: one epoch at batch 10, seed 1."""
    return train_recipe("net-1epoch", seed=1)


@pytest.fixture(scope="session")
def ressenet_8epoch_run():
    """The ressenet-8epoch recipe exactly as `python main.py --recipe ressenet-8epoch` runs it, seed 1."""
    return train_recipe("ressenet-8epoch", seed=1)


@pytest.fixture(scope="session")
def net_1epoch_checkpoint(net_1epoch_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("net-1epoch")
    save_run(out, *net_1epoch_run)
    return out / "model.pt"


@pytest.fixture(scope="session")
def ressenet_8epoch_folder(ressenet_8epoch_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ressenet-8epoch")
    save_run(out, *ressenet_8epoch_run)
    return out


@pytest.fixture(scope="session")
def ressenet_8epoch_onnx(ressenet_8epoch_folder, tmp_path_factory):
    """The ressenet-8epoch run exported as `python main.py export RUN --int8` exports it: (model.onnx, model.int8.onnx,
    what the command printed). In a fresh interpreter: nothing but the tests of the command line imports it."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = run_cli("export", str(ressenet_8epoch_folder), "--out", str(out), "--int8", "--data-dir", DATA_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, out.with_name("model.int8.onnx"), r.stdout


@pytest.fixture(scope="session")
def untrained_folder(tmp_path_factory):
    """A run folder as main.py writes it (model.pt, metrics.json) holding the net-1epoch network as initialised
    from seed 1, never trained: for the tests of commands, files and the server's protocol, which need a
    checkpoint but no accuracy (those that do are marked slow and use a trained run)."""
    import model
    folder = tmp_path_factory.mktemp("untrained") / "run"
    folder.mkdir()
    config = recipes.recipe_config("net-1epoch", data_dir=DATA_DIR)
    torch.manual_seed(config.seed)
    net = model.build_model(config.model).eval()
    metrics = {"recipe": config.recipe, "model": config.model, "parameters": model.count_parameters(net),
               "seed": config.seed, "epochs": []}
    run_folder.save(str(folder), dataclasses.asdict(config), net, metrics)
    return folder


@pytest.fixture(scope="session")
def declining_folder(tmp_path_factory):
    """A run folder holding an untrained ressenet-nd whose threshold (1.5) is over any probability: it
    declines every mark, for the tests of how "not a digit" is said (the shipped reader's test measures how well)."""
    import model
    folder = tmp_path_factory.mktemp("declining") / "run"
    folder.mkdir()
    config = recipes.recipe_config("ressenet-nd-writers-clean-30epoch", data_dir=DATA_DIR)
    torch.manual_seed(config.seed)
    net = model.build_model(config.model).eval()
    net.threshold.fill_(1.5)
    metrics = {"recipe": config.recipe, "model": config.model, "parameters": model.count_parameters(net),
               "seed": config.seed, "epochs": []}
    run_folder.save(str(folder), dataclasses.asdict(config), net, metrics)
    return folder


@pytest.fixture(scope="session")
def stub_server(untrained_folder):
    """The server answering with an untrained network: every route, limit and refusal of the protocol, without
    training anything first."""
    srv = start_server(untrained_folder / "model.pt")
    yield srv
    stop_server(srv)


TRAINED_FIXTURES = {"net_1epoch_run", "ressenet_8epoch_run", "net_1epoch_checkpoint", "ressenet_8epoch_folder",
                    "ressenet_8epoch_onnx", "server", "page", "static_site"}


def pytest_collection_modifyitems(config, items):
    """The browser tests run only when asked for (`pytest -m browser`): any other -m, or none, leaves them out, so
    `pytest -m "not slow"` needs no Chromium."""
    if "browser" in (config.option.markexpr or ""):
        return
    browser = [item for item in items if item.get_closest_marker("browser")]
    if browser:
        config.hook.pytest_deselected(items=browser)
        items[:] = [item for item in items if not item.get_closest_marker("browser")]


@pytest.fixture(autouse=True)
def only_slow_tests_train(request, monkeypatch):
    """`pytest -m "not slow"` trains nothing: a test not marked slow that trains in this process fails. (The browser
    tests, run only by `pytest -m browser`, draw on a trained network.)"""
    if request.node.get_closest_marker("slow") is None and request.node.get_closest_marker("browser") is None:
        trained = sorted(set(request.fixturenames) & TRAINED_FIXTURES)
        assert not trained, f"this test uses a trained network ({', '.join(trained)}): mark it @pytest.mark.slow"

        def refuse(*args, **kwargs):
            raise AssertionError("this test trains a network: mark it @pytest.mark.slow")
        monkeypatch.setattr(model_train, "train_one_epoch", refuse)


def write_digit_variants(folder, images, labels):
    """Real test digits as PNG files, the ways people make them; returns [(path, label)]."""
    files = []
    for i, (a, label) in enumerate(zip(images, labels)):
        a = a.numpy()
        paper = Image.new("L", (300, 200), 255)  # dark ink on white paper, 5x larger, off-centre
        paper.paste(Image.fromarray(255 - a).resize((140, 140), Image.BILINEAR), (150, 10))
        rgba = np.zeros((56, 56, 4), np.uint8)  # black ink drawn through the alpha channel
        rgba[..., 3] = np.kron(a, np.ones((2, 2), np.uint8))
        variants = {"plain": Image.fromarray(a), "paper": paper, "rgba": Image.fromarray(rgba, "RGBA"),
                    "16bit": Image.fromarray(a.astype(np.uint16) * 257)}
        for kind, img in variants.items():
            path = folder / f"{i}-{kind}.png"
            img.save(path)
            files.append((path, int(label)))
    return files


def predicted(stdout):
    """{image path: digit} from predict's output lines."""
    return {line.split(": ")[0]: int(line.split(": ")[1].split()[0]) for line in stdout.splitlines()}


def png_claiming_size(path, width, height):
    """A PNG whose header claims width x height pixels, as a decompression bomb does, in a few bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


# --- the server: serve.make_server on a free port, in a thread of this process ------------------------------

def start_server(checkpoint):
    """serve.make_server on a free port with `checkpoint`, serving from a thread; stop it with stop_server."""
    import serve
    model, loaded = run_folder.load_checkpoint(checkpoint)
    srv = serve.make_server(serve.Predictor(reader.digit_reader(model, loaded), shipped_row_reader(),
                                            reader.decline_threshold(model)), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop_server(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def server(net_1epoch_checkpoint):
    srv = start_server(net_1epoch_checkpoint)
    yield srv
    stop_server(srv)


def http_request(srv, method, path, body=None, headers=None, timeout=30):
    """(status, parsed JSON or raw bytes) of one request to the test server."""
    import http.client
    import json
    connection = http.client.HTTPConnection(*srv.server_address[:2], timeout=timeout)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json") and method != "HEAD"
    return response.status, json.loads(data) if is_json else data


def raw_request(srv, head, body=b"", shut=False):
    """Send bytes as they are (a header block and part of a body); return the answer's status line and body."""
    with socket.create_connection(srv.server_address[:2], timeout=30) as s:
        s.sendall(head + body)
        if shut:
            s.shutdown(socket.SHUT_WR)
        answer = s.makefile("rb").read().decode("latin-1")
    status, _, rest = answer.partition("\r\n")
    return status, rest.partition("\r\n\r\n")[2]


# --- the drawing page in a real headless Chromium (pytest -m browser) ------------------------------------------

@pytest.fixture(scope="session")
def browser():
    """Debian's chromium and chromium-driver (or a Chrome and its driver), driven by Selenium: headless, at a
    desktop window size. A missing browser fails here: the browser tests never skip."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    found = [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    assert any(found) and shutil.which("chromedriver"), "install chromium and chromium-driver (README, Tests)"
    options.binary_location = next(path for path in found if path)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, server):
    browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
    return browser


def strokes_of(image, every=1):
    """The pointer strokes that draw an image of ink (uint8 (H, W), light on black): one along each run of ink in
    every `every`-th row, as (row, first column, last column)."""
    strokes = []
    for row in range(0, image.shape[0], every):
        ink = (image[row] > 128).tolist() + [False]
        start = None
        for col, on in enumerate(ink):
            if on and start is None:
                start = col
            elif not on and start is not None:
                strokes.append((row, start, col - 1))
                start = None
    return strokes


def draw_digit(driver, image, touch=False, every=1):
    """Draw an image of ink (a 28x28 MNIST digit, or a number written with them) on the page's canvas as pointer
    strokes, as large as the canvas holds, centred; returns the number of strokes."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    canvas = driver.find_element("id", "pad")
    width, height = canvas.size["width"], canvas.size["height"]
    cell = min(height / image.shape[0], width / image.shape[1])
    kind = interaction.POINTER_TOUCH if touch else interaction.POINTER_MOUSE
    actions = ActionBuilder(driver, mouse=PointerInput(kind, "finger" if touch else "mouse"), duration=0)
    strokes = strokes_of(image, every)
    for row, first, last in strokes:
        y = (row + 0.5 - image.shape[0] / 2) * cell  # offsets from the canvas's centre
        x0, x1 = ((col + 0.5 - image.shape[1] / 2) * cell for col in (first, last))
        actions.pointer_action.move_to(canvas, int(x0), int(y)).pointer_down()
        actions.pointer_action.move_to(canvas, int(x1), int(y)).pointer_up()
    actions.perform()
    return len(strokes)


def wait_for_answer(driver, strokes, timeout=30):
    """The page's answer once it is for all `strokes` strokes: (number text, error text)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.shown") == str(strokes))
    return driver.find_element("id", "number").text, driver.find_element("id", "error").text


def digit_tensor(path):
    """An image file of one digit as the network's input (1, 28, 28), prepared as predict prepares it."""
    return torch.from_numpy(digit_image.read_digit(path))[None]
