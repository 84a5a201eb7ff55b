"""The server under load and hostile clients, measured from outside its handlers: serve.py's own server, started in
this process on a free port as `python main.py serve` starts it, and spoken to over loopback sockets.

    python load_test.py                         # the newest runs/*/model.pt, else the shipped reader
    python load_test.py --checkpoint runs/X

It sends 128 simultaneous POSTs of real test digits and compares them with the same digits sent one by one;
reads the peak memory (VmHWM, this process) above idle while 64 simultaneous 4096x4096 uploads are read; times the
slowest of 10 normal requests made while 200 slow clients hold connections open, and how long any of those
outlives its deadline; sends a hostile set (malformed request lines, headers, lengths; clients that reset or leave
early), counting the tracebacks written to stderr; and times how long stopping the server takes. Every request
goes to 127.0.0.1 only, and each loop is bounded.
"""
import argparse
import contextlib
import http.client
import io
import json
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

import data_file
import serve
from errors import exit_status


def memory_kb(field):
    """VmRSS (now) or VmHWM (the peak) of this process, in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_test(checkpoint, data_dir, log=print):
    data_file.ensure_mnist(data_dir, log=log)
    images = data_file.read_split(data_dir, "test")[0][:16]
    digits = [png(Image.fromarray(255 - a.numpy()).resize((280, 280), Image.BILINEAR)) for a in images]
    line, probabilities, rows, threshold = serve.load_model(checkpoint)
    log(line)
    server = serve.make_server(serve.Predictor(probabilities, rows, threshold), "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(body, barrier=None):
        if barrier is not None:
            barrier.wait()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        answer = (response.status, json.loads(response.read()))
        connection.close()
        return answer

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # what the server's threads write: tracebacks are counted
            idle = memory_kb("VmRSS")
            alone = [post(body) for body in digits]
            barrier = threading.Barrier(128)
            with ThreadPoolExecutor(128) as pool:
                burst = list(pool.map(lambda i: post(digits[i % 16], barrier), range(128)))
            same = sum(answer == alone[i % 16] for i, answer in enumerate(burst))
            log(f"128 simultaneous POSTs: {sum(s == 200 for s, _ in burst)} answered 200, {same} identical to the "
                f"same digit sent alone")

            large = png(Image.fromarray(255 - images[0].numpy()).resize((4096, 4096), Image.BILINEAR))
            barrier = threading.Barrier(64)
            with ThreadPoolExecutor(64) as pool:
                big = list(pool.map(lambda i: post(large, barrier), range(64)))
            peak = memory_kb("VmHWM")
            log(f"64 simultaneous 4096x4096 uploads ({len(large):,} bytes each): {sum(s == 200 for s, _ in big)} "
                f"answered 200; peak memory {peak / 1024:.0f} MB, {(peak - idle) / 1024:.0f} MB above idle "
                f"({idle / 1024:.0f} MB, this process: server and clients)")

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
            log(f"200 slow clients: the slowest of 10 normal requests beside them {1000 * max(latencies):.0f} ms; "
                f"each slow client cut off after {min(held):.1f}-{max(held):.1f} s (the deadline: "
                f"{serve.REQUEST_DEADLINE_S} s)")

            hostile = [b"NONSENSE\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
                       b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"GET / HTTP/2.0\r\n\r\n",
                       b"POST /predict HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n",
                       b"POST /predict HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"\x00\xff" * 100 + b"\r\n\r\n",
                       b"DELETE / HTTP/1.1\r\n\r\n", b"GET /../main.py HTTP/1.1\r\n\r\n"]
            head = b"POST /predict HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(digits[0])
            answered = 0
            for _ in range(40):
                for request in hostile:
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                        s.sendall(request)
                        answered += s.makefile("rb").readline().startswith(b"HTTP/1.0 ")
                for cut in (len(digits[0]) // 2, len(digits[0])):  # reset mid-body, and gone before the answer
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                    s.sendall(head + digits[0][:cut])
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
            log(f"hostile set: {40 * len(hostile)} malformed requests, {answered} answered with a status line; "
                f"80 clients reset mid-request or gone before the answer")
    finally:
        start = time.monotonic()
        server.shutdown()
        server.server_close()
    log(f"stopped in {time.monotonic() - start:.2f} s; tracebacks written by the server over the whole run: "
        f"{errors.getvalue().count('Traceback')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="the checkpoint served (default: the newest runs/*/model.pt, else the "
                                        "shipped reader)")
    p.add_argument("--data-dir", default="./data", help="where MNIST is kept (default: ./data)")
    args = p.parse_args(argv)
    return exit_status(lambda: load_test(args.checkpoint, args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
