"""Draw a digit in the browser: a page (draw.html) and POST /predict, served by the standard library.

    python main.py serve                         # the newest runs/*/model.pt, at http://127.0.0.1:8000/
    python main.py serve --checkpoint runs/X --port 8080

The page posts the canvas as a PNG after every stroke; the answer comes from exactly `predict`'s path
(data_file.digit_from_image, then the network, with TTA when the checkpoint's run was scored with it), with the
28x28 image the network saw. Only two routes exist: GET / (the page) and POST /predict; nothing on disk is
served by its path. Bodies are bounded (MAX_BODY) and checked before they are read.
"""
import base64
import http.server
import io
import json
import os
import threading
import urllib.parse

import torch
from PIL import Image

import data_file
import model_train

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "draw.html")
MAX_BODY = 1 << 20  # 1 MiB: a 280x280 canvas PNG is ~5-20 kB; a phone's at devicePixelRatio 3 under 200 kB
MAX_PIXELS = 4096 * 4096  # a small PNG can claim a huge canvas: refused from its header, never decoded
READ_TIMEOUT_S = 10  # a client that stops sending mid-request frees its thread after this


def preview_png(digit):
    """The network's input (1, 28, 28), normalised, as a data: URL of a 28x28 greyscale PNG (ink white)."""
    pixels = (digit[0] * data_file.STD + data_file.MEAN).clamp(0, 1).mul(255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Predictor:
    """A loaded checkpoint answering for PNG bytes; one forward pass at a time (the server is threaded)."""

    def __init__(self, model, checkpoint):
        self.model, self.tta = model, model_train.checkpoint_tta(checkpoint)
        self.lock = threading.Lock()

    def __call__(self, body):
        """{"digit", "probabilities", "preview"} for an uploaded image; data_file.ImageError if it holds none."""
        digit = data_file.digit_from_image(io.BytesIO(body), name="the uploaded image", max_pixels=MAX_PIXELS)
        with self.lock:
            probs = model_train.digit_probabilities(self.model, digit, self.tta)
        return {"digit": int(probs.argmax()), "probabilities": [round(p, 6) for p in probs.tolist()],
                "preview": preview_png(digit)}


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / and POST /predict; every error a JSON {"error": ...} with its status. server.predictor answers."""

    server_version = "mnist-draw"
    timeout = READ_TIMEOUT_S
    ROUTES = {"/": "GET", "/predict": "POST"}

    def log_message(self, format, *args):  # quiet: the terminal shows the address, not every stroke
        pass

    def send_json(self, status, payload, close=False, headers=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *headers):
            self.send_header(name, value)
        if close:  # an unread body may still be on the socket: this connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the body it leaves out
            self.wfile.write(body)

    def route(self, method):
        """The path's route, or None after answering 404 (unknown path) or 405 (another method)."""
        path = urllib.parse.urlsplit(self.path).path
        if path not in self.ROUTES:
            self.send_json(404, {"error": f"no such page: {path}"}, close=method != "GET")
            return None
        if self.ROUTES[path] != method:
            allowed = self.ROUTES[path]
            self.send_json(405, {"error": f"{method} is not allowed on {path}; use {allowed}"}, close=True,
                           headers=[("Allow", allowed)])
            return None
        return path

    def do_GET(self):
        if self.route("GET"):
            body = self.server.page
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_POST(self):
        if not self.route("POST"):
            return
        length = self.headers.get("Content-Length")
        if length is None:
            return self.send_json(411, {"error": "Content-Length is required"}, close=True)
        if not length.isdigit():
            return self.send_json(400, {"error": f"bad Content-Length: {length!r}"}, close=True)
        if int(length) > MAX_BODY:
            return self.send_json(413, {"error": f"the image is over {MAX_BODY:,} bytes"}, close=True)
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            return self.send_json(400, {"error": "the body did not arrive in time"}, close=True)
        if len(body) < int(length):
            return self.send_json(400, {"error": "the body is shorter than its Content-Length"}, close=True)
        try:
            answer = self.server.predictor(body)
        except data_file.ImageError as e:
            return self.send_json(400, {"error": str(e)})
        except Exception as e:  # the page shows it; the server goes on serving
            return self.send_json(500, {"error": f"the server failed: {type(e).__name__}: {e}"})
        self.send_json(200, answer)

    def __getattr__(self, name):
        # Every other method (HEAD, PUT, DELETE, FOO, ...) is answered 405 on a known path and 404 elsewhere,
        # where BaseHTTPRequestHandler would answer 501 for a method it has no do_ function for.
        if name.startswith("do_"):
            return lambda: self.route(self.command)
        raise AttributeError(name)


def make_server(predictor, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer bound to (host, port) answering with `predictor`; port 0 picks a free one."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    # Ctrl-C joins the handler threads (each bounded by the read timeout) before the interpreter shuts down:
    # a daemon thread cut off mid-request there could abort the process ("terminate called without an active
    # exception", 1 run in 8 of the Ctrl-C test).
    server.daemon_threads, server.block_on_close = False, True
    server.predictor = predictor
    with open(PAGE, "rb") as f:
        server.page = f.read()
    return server
