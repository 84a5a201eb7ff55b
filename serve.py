"""Read handwriting in the browser: a page (draw.html) and POST /predict, served by the standard library.

    python main.py serve                         # the newest runs/*/model.pt, at http://127.0.0.1:8000/
    python main.py serve --checkpoint runs/X --port 8080

The page posts the canvas as a PNG after every stroke; the answer comes from exactly `predict`'s path
(digit_image.read_number: the row reader, then the digit network, with TTA when the checkpoint's run was scored
with it): the number, and each digit's probabilities, box and the 28x28 image the network saw. This file needs no
torch: the networks are functions handed to Predictor (load_model: checkpoints through torch, or ONNX files
through onnxruntime alone). Only two routes exist: GET / (the page) and POST /predict; nothing on disk is served by its
path. What a client can cost is bounded: the body (MAX_BODY, checked before it is read; bodies over LARGE_BODY,
phone photos, read a few at a time), the pixels (MAX_PIXELS,
from the header; larger images are reduced as they are decoded, digit_image.MAX_SIDE), the images decoded at once
(DECODES_AT_ONCE), the time a request may take to arrive (REQUEST_DEADLINE_S, then 408), and the connections open
at once (MAX_CONNECTIONS, then 503). Every answer, the standard library's own refusals too, is JSON; a client that
goes away mid-request leaves no traceback.
"""
import argparse
import email.parser
import email.policy
import http.server
import io
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import digit_image

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "draw.html")
MAX_BODY = 8 << 20  # 8 MiB: a phone's photo of a written number (3-5 MB); a canvas PNG is ~5-200 kB
LARGE_BODY = 1 << 20  # bodies over 1 MiB (photos) are read LARGE_BODIES_AT_ONCE at a time ...
LARGE_BODIES_AT_ONCE = 4  # ... so that MAX_CONNECTIONS slow uploads hold at most ~300 MB between them
MAX_PIXELS = 4096 * 4096  # a small PNG can claim a huge canvas: refused from its header, never decoded
DECODES_AT_ONCE = 2  # each decode of a 4096x4096 upload holds up to ~100 MB while it lasts
REQUEST_DEADLINE_S = 10  # a request's line, headers and body must all arrive within this, however slowly sent
MAX_CONNECTIONS = 256  # open at once; one more is answered 503 at once, never queued behind slow clients
BACKLOG = 128  # connections the kernel holds while the server accepts: a burst of clients waits, none is reset


class Predictor:
    """Answers for uploaded image bytes from `probabilities` (prepared digits (N, 28, 28) -> numpy (N, 10)) and
    the row reader's `row_frames` (digit_image.row_digits): the
    images read (digit_image.read_digits) by DECODES_AT_ONCE threads of its own, one forward pass at a time (the
    server is threaded). Decoding in a few fixed threads, not in every handler's, also keeps the memory an image
    needed in few allocator arenas, to be reused by the next image."""

    def __init__(self, probabilities, row_frames, threshold=0.0):
        self._probabilities, self._row_frames, self.lock = probabilities, row_frames, threading.Lock()
        self.threshold = threshold  # a mark read under this confidence is "not a digit" (digit_image.declined)
        self.decoder = ThreadPoolExecutor(DECODES_AT_ONCE, "decode")

    def probabilities(self, digits):
        with self.lock:
            return self._probabilities(digits)

    def row_frames(self, row):
        with self.lock:
            return self._row_frames(row)

    def read(self, body):
        return digit_image.read_number(io.BytesIO(body), self.probabilities, self.row_frames,
                                       name="the uploaded image", max_pixels=MAX_PIXELS, threshold=self.threshold)

    def __call__(self, body):
        """digit_image.answer's {"number", "digits", ...} for an uploaded image; ImageError if it holds none."""
        return digit_image.answer(*self.decoder.submit(self.read, body).result(), self.threshold)


def uploaded_image(content_type, body):
    """The image in a POST body: the body itself (`curl --data-binary @x.png`, the page's fetch), or the one file of
    a multipart/form-data upload (`curl -F image=@x.png`, an HTML form), parsed by the standard library's email
    parser. A multipart body with no file or several is an ImageError (400)."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return body
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    files = [part for part in message.iter_parts() if part.get_filename() is not None] \
        if message.is_multipart() else []
    if len(files) != 1:
        raise digit_image.ImageError(f"a multipart/form-data upload must hold one file, not {len(files)}")
    return files[0].get_payload(decode=True) or b""


def busy_answer():
    """The whole 503 answer to a connection over MAX_CONNECTIONS, written before any handler exists for it."""
    body = json.dumps({"error": f"the server has {MAX_CONNECTIONS} connections open; try again"}).encode()
    return (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            f"\r\nConnection: close\r\n\r\n").encode() + body


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / and POST /predict; every error a JSON {"error": ...} with its status. server.predictor answers."""

    server_version = "mnist-draw"
    timeout = REQUEST_DEADLINE_S  # also bounds a write to a client that stops reading
    ROUTES = {"/": "GET", "/predict": "POST"}

    def log_message(self, format, *args):  # quiet: the terminal shows the address, not every stroke
        pass

    def handle_one_request(self):
        self.server.start_deadline(self.connection)  # for this request's line, headers and body
        super().handle_one_request()

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

    def send_error(self, code, message=None, explain=None):
        # The standard library's own refusals (a bad request line, 414, 431, 505) in the shape of every answer,
        # with a status line even when the request line was too broken to say its HTTP version.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]}, close=True)

    def late(self):
        """Whether the request came whole only after its deadline (cut off in its headers, say): then answered 408."""
        if self.server.past_deadline(self.connection):
            self.send_json(408, {"error": f"the request did not arrive within {REQUEST_DEADLINE_S} s"}, close=True)
            return True
        return False

    def route(self, method):
        """The path's route, or None after answering 408 (late), 404 (unknown path) or 405 (another method)."""
        if self.late():
            return None
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
            self.server.end_deadline(self.connection)
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
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, and int("²") fails
            return self.send_json(400, {"error": f"bad Content-Length: {length!r}"}, close=True)
        if int(length) > MAX_BODY:
            return self.send_json(413, {"error": f"the image is over {MAX_BODY:,} bytes: send a smaller one (a phone "
                                                f"photo scaled to about 1,000 px on its longer side is ~200 kB)"},
                                  close=True)
        large = int(length) > LARGE_BODY
        if large and not self.server.large_bodies.acquire(blocking=False):
            return self.send_json(503, {"error": f"{LARGE_BODIES_AT_ONCE} images over {LARGE_BODY:,} bytes are "
                                                 f"being read already: try again, or send a smaller one"}, close=True)
        try:  # a large body is held, read and answered, within its share of LARGE_BODIES_AT_ONCE
            self.answer_body(int(length))
        finally:
            if large:
                self.server.large_bodies.release()

    def answer_body(self, length):
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body = b""
        if len(body) < length:
            if self.late():
                return
            return self.send_json(400, {"error": "the body is shorter than its Content-Length"}, close=True)
        self.server.end_deadline(self.connection)
        try:
            answer = self.server.predictor(uploaded_image(self.headers.get("Content-Type"), body))
        except digit_image.ImageError as e:
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


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once, each request held to REQUEST_DEADLINE_S by one
    watchdog thread that cuts off the reading side of a late connection (the handler then answers 408)."""

    request_queue_size = BACKLOG
    # Ctrl-C joins the handler threads before the interpreter shuts down (a daemon thread cut off mid-request
    # there could abort the process); server_close first cuts every connection, so the join takes milliseconds.
    daemon_threads, block_on_close = False, True

    def __init__(self, address, predictor, page):
        self.deadlines, self.lock = {}, threading.Lock()  # open connection -> its request's deadline, or None
        super().__init__(address, Handler)  # binds: an address in use fails here, and closes what it opened
        self.predictor, self.page = predictor, page
        self.large_bodies = threading.BoundedSemaphore(LARGE_BODIES_AT_ONCE)
        threading.Thread(target=self.watch_deadlines, daemon=True).start()

    def process_request(self, request, client_address):
        with self.lock:
            full = len(self.deadlines) >= MAX_CONNECTIONS
            if not full:
                self.deadlines[request] = None
        if full:
            try:
                request.sendall(busy_answer())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.lock:
            self.deadlines.pop(request, None)
        super().shutdown_request(request)

    def start_deadline(self, connection):
        with self.lock:
            self.deadlines[connection] = time.monotonic() + REQUEST_DEADLINE_S

    def end_deadline(self, connection):
        """The request has arrived whole: answering it is not held to the deadline."""
        with self.lock:
            self.deadlines[connection] = None

    def past_deadline(self, connection):
        deadline = self.deadlines.get(connection)
        return deadline is not None and time.monotonic() >= deadline

    def watch_deadlines(self):
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self.lock:
                late = [c for c, deadline in self.deadlines.items() if deadline is not None and deadline <= now]
            for connection in late:
                cut(connection, socket.SHUT_RD)  # its blocked read returns at once

    def handle_error(self, request, client_address):
        # A client that went away mid-request (reset, closed early, cut off) is no fault of the server's.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        print(f"error: a request from {client_address[0]} failed: {type(error).__name__}: {error}", file=sys.stderr)

    def server_close(self):
        with self.lock:
            open_now = list(self.deadlines)
        for connection in open_now:  # slow clients included: Ctrl-C ends the server at once
            cut(connection, socket.SHUT_RDWR)
        super().server_close()


def cut(connection, how):
    try:
        connection.shutdown(how)
    except OSError:  # closed already
        pass


def load_model(checkpoint=None, onnx=None, rows=None):
    """(a line saying what answers, its `probabilities` function, its row reader's `row_frames`, the confidence under
    which it declines) for Predictor:
    the ONNX file `onnx` and the rows.onnx beside it (or `rows`) run by onnxruntime (torch is never imported),
    else the checkpoint (a model.pt or run folder; None: the newest runs/*/model.pt) and the row reader `rows`
    (run_folder.load_row_reader). All are loaded now, so a file that is not one is refused before the server
    starts."""
    if onnx:
        import onnx_model
        model = onnx_model.OnnxModel(onnx)
        row_model = onnx_model.OnnxRows(rows or os.path.join(os.path.dirname(onnx), onnx_model.ROWS_FILE))
        return (f"{onnx}: {model.config.get('model', '?')}, recipe {model.config.get('recipe', '?')}, onnxruntime"
                f"{', predicting with TTA' if model.tta else ''}; rows read by {row_model.path}"), \
            model.probabilities, row_model.row_frames, model.threshold
    import reader
    import run_folder
    path, model, stored = run_folder.load_named_checkpoint(checkpoint)
    rows_path, row_model, _ = run_folder.load_row_reader(rows)
    tta = ", predicting with TTA" if reader.checkpoint_tta(stored) else ""
    line = f"{path}: {stored['model_name']}, recipe {stored.get('config', {}).get('recipe', '?')}{tta}; rows read " \
           f"by {rows_path}"
    return line, reader.digit_reader(model, stored), reader.row_reader(row_model), reader.decline_threshold(model)


def make_server(predictor, host="127.0.0.1", port=8000):
    """A Server bound to (host, port) answering with `predictor`; port 0 picks a free one."""
    with open(PAGE, "rb") as f:
        page = f.read()
    return Server((host, port), predictor, page)


def port_number(text):
    """--port's argparse type: 0 to 65535 (0: any free port)."""
    port = int(text)
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number, 0 to 65535, got {text!r}")
    return port


def serve_until_interrupted(server, log=print):
    """Serve until Ctrl-C (or SIGTERM, raised as KeyboardInterrupt by main.py), then close every connection."""
    host, port = server.server_address[:2]
    log(f"open http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/ to write a number (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
