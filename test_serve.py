"""python main.py serve: a real server on a free port, spoken to over HTTP by well-behaved and hostile clients;
then the drawing page in a real headless Chromium (pytest -m browser). The fixtures are in conftest.py."""
import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import composed_numbers
import digit_image
import main
import reader
import run_folder
import serve
from conftest import (DATA_DIR, HERE, digit_tensor, draw_digit, http_request, in_process, one_line_error,
                      png_claiming_size, predicted, raw_request, shipped_row_reader, start_server, stop_server,
                      wait_for_answer, write_digit_variants)


# --- the server over HTTP -----------------------------------------------------------------------------------

def test_serve_without_checkpoint_or_port_is_a_one_line_error(tmp_path, untrained_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder, "SHIPPED", str(tmp_path / "no-reader.pt"))
    r = in_process(main.main, ["serve"], capsys)
    assert one_line_error(r) and "python main.py" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        shutil.copytree(untrained_folder, tmp_path / "runs" / "x")
        r = in_process(main.main, ["serve", "--port", str(port)], capsys)
        assert one_line_error(r) and f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr


def test_serve_binds_to_loopback_and_stops_cleanly_on_ctrl_c(tmp_path, untrained_folder):
    shutil.copytree(untrained_folder, tmp_path / "runs" / "x")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "main.py"), "serve", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert lines[1].startswith("open http://127.0.0.1:"), lines
    url = lines[1].split()[1]
    assert urllib.request.urlopen(url, timeout=30).status == 200
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "stopped" and err == ""


@pytest.mark.slow
def test_server_predicts_real_digits_as_predict_does(server, net_1epoch_checkpoint, test_digits, tmp_path, capsys):
    files = write_digit_variants(tmp_path, test_digits[0][:10], test_digits[1][:10])
    said = predicted(in_process(main.main, ["predict", *[str(p) for p, _ in files], "--checkpoint",
                                            str(net_1epoch_checkpoint)], capsys).stdout)
    model, checkpoint = run_folder.load_checkpoint(net_1epoch_checkpoint)
    one = 0
    for path, label in files:
        status, answer = http_request(server, "POST", "/predict", path.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and int(answer["number"]) == said[str(path)]
        if len(answer["digits"]) == 1:  # one digit: today's fields, from today's preparation and scoring
            expected = reader.probabilities(model, digit_image.read_digit(path)[None], False)[0]
            assert answer["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
            assert answer["preview"].startswith("data:image/png;base64,")
            one += 1
    assert one >= 38
    status, page = http_request(server, "GET", "/")
    assert status == 200 and b"<canvas" in page and b"http" not in page.split(b"<script>")[1]  # nothing fetched


def test_the_server_says_not_a_digit_as_predict_does(declining_folder, test_digits):
    srv = start_server(declining_folder / "model.pt")
    try:
        status, answer = http_request(srv, "POST", "/predict", composed_numbers.png(test_digits[0][0].numpy()))
        assert status == 200 and answer["not_a_digit"] and answer["number"] == "?" and answer["digits"][0]["declined"]
    finally:
        stop_server(srv)


def test_server_answers_bad_requests_with_the_right_status_and_keeps_serving(stub_server, tmp_path):
    server = stub_server  # the protocol: an untrained network answers as well as any
    blank = tmp_path / "blank.png"
    Image.new("L", (280, 280), 255).save(blank)
    png_claiming_size(tmp_path / "vast.png", 5000, 5000)  # 25 MP: under PIL's bomb limit, over the server's
    for body, status in ((b"not an image", 400), (blank.read_bytes(), 400), (b"", 400),
                         ((tmp_path / "vast.png").read_bytes(), 400)):
        got, answer = http_request(server, "POST", "/predict", body)
        assert got == status and "error" in answer
    for path in ("/model.pt", "/draw.html", "/serve.py", "/../main.py", "/runs/", "/predict/x"):
        assert http_request(server, "GET", path)[0] == 404, path
    for method, path in (("PUT", "/predict"), ("DELETE", "/"), ("GET", "/predict"), ("POST", "/"), ("HEAD", "/")):
        assert http_request(server, method, path)[0] == 405, (method, path)
    # Over the limit: refused from the header alone, while most of the body has not been sent.
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (serve.MAX_BODY + 1)
    assert raw_request(server, head, b"x" * 1000)[0].split()[1] == "413"
    assert raw_request(server, b"POST /predict HTTP/1.1\r\nHost: x\r\n\r\n")[0].split()[1] == "411"
    assert raw_request(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")[0].split()[1] == "400"
    short = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert raw_request(server, short, b"x" * 10, shut=True)[0].split()[1] == "400"
    assert http_request(server, "GET", "/")[0] == 200  # still serving


def test_a_phone_photo_of_several_megabytes_is_read_and_large_bodies_are_read_a_few_at_a_time(stub_server,
                                                                                             test_digits):
    # A 4000x3000 photo: paper with grain (what makes a phone's JPEG megabytes), a number written across it.
    rng = np.random.default_rng(0)
    paper = rng.normal(200, 12, (750, 1000)).clip(0, 255).astype(np.uint8)
    for k in range(3):
        paper[250:530, 200 + 220 * k:480 + 220 * k] = np.minimum(
            paper[250:530, 200 + 220 * k:480 + 220 * k],
            255 - np.asarray(Image.fromarray(test_digits[0][k].numpy()).resize((280, 280), Image.BILINEAR)))
    photo = io.BytesIO()
    Image.fromarray(paper).resize((4000, 3000), Image.NEAREST).save(photo, format="JPEG", quality=95)
    body = photo.getvalue()
    assert serve.LARGE_BODY < len(body) <= serve.MAX_BODY, len(body)
    got, answer = http_request(stub_server, "POST", "/predict", body)
    assert got == 200 and len(answer["number"]) == 3 and answer["digits"][0]["box"][0] >= 700  # boxes in its pixels
    # Every share of LARGE_BODIES_AT_ONCE taken: the next large body is refused at once (503), a small one is not.
    # (a slow client of another test may hold a share until its deadline cuts it off)
    taken = [stub_server.large_bodies.acquire(timeout=serve.REQUEST_DEADLINE_S + 5)
             for _ in range(serve.LARGE_BODIES_AT_ONCE)]
    try:
        assert all(taken) and http_request(stub_server, "POST", "/predict", body)[0] == 503
        small = composed_numbers.png(test_digits[0][0].numpy())
        assert http_request(stub_server, "POST", "/predict", small)[0] == 200
    finally:
        for _ in filter(None, taken):
            stub_server.large_bodies.release()


def test_server_answers_concurrent_requests_each_its_own(stub_server, test_digits, tmp_path):
    server = stub_server  # the protocol: an untrained network answers as well as any
    files = [p for p, _ in write_digit_variants(tmp_path, test_digits[0][:8], test_digits[1][:8]) if "paper" in p.name]
    alone = [http_request(server, "POST", "/predict", p.read_bytes())[1]["probabilities"] for p in files]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: http_request(server, "POST", "/predict", files[i % 8].read_bytes()),
                                range(64)))
    assert all(status == 200 and answer["probabilities"] == alone[i % 8] for i, (status, answer) in enumerate(answers))


# --- the server under load and hostile clients: bursts, slow clients, clients that go away -----------------------

def post_bytes(port, body, barrier=None):
    """One POST /predict of `body` on a connection of its own, opened when `barrier` lets every client go at once:
    (status, parsed JSON)."""
    import http.client
    import json
    if barrier is not None:
        barrier.wait()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
    response = connection.getresponse()
    answer = response.status, json.loads(response.read())
    connection.close()
    return answer


@pytest.mark.slow
def test_a_burst_of_128_clients_is_answered_each_as_if_alone(stub_server, test_digits, tmp_path):
    server = stub_server  # the protocol: an untrained network answers as well as any
    import threading
    files = [p.read_bytes() for p, _ in write_digit_variants(tmp_path, test_digits[0][:8], test_digits[1][:8])
             if "plain" in p.name]
    port = server.server_address[1]
    alone = [post_bytes(port, body) for body in files]
    barrier = threading.Barrier(128)
    with ThreadPoolExecutor(128) as pool:  # 128 connections opened at the same instant: none is reset
        answers = list(pool.map(lambda i: post_bytes(port, files[i % 8], barrier), range(128)))
    assert answers == [alone[i % 8] for i in range(128)]


def slow_client(port, head=b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"):
    """A connection that sends a request's start and then nothing more: what a slow or hostile client holds open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def test_slow_clients_are_cut_off_at_the_deadline_and_never_delay_others(stub_server, monkeypatch):
    server = stub_server  # the protocol: an untrained network answers as well as any
    import time
    monkeypatch.setattr(serve, "REQUEST_DEADLINE_S", 1)
    port = server.server_address[1]
    slow = [slow_client(port) for _ in range(20)] + [slow_client(port, b"POST /predict HTTP/1.1\r\nHo")]
    start = time.monotonic()
    status, _ = http_request(server, "GET", "/")
    assert status == 200 and time.monotonic() - start < 1  # served beside them, not after them
    answers = [s.makefile("rb").read().decode("latin-1") for s in slow]  # each ends when the server cuts it off
    waited = time.monotonic() - start
    for s in slow:
        s.close()
    assert waited < 3, waited  # the deadline, checked every 0.1 s, with room for a loaded machine
    assert all(a.startswith("HTTP/1.0 408 ") and '"error"' in a for a in answers)  # the last cut off in its headers


def test_an_image_uploaded_as_a_form_reads_as_the_same_image_sent_raw(stub_server, test_digits, tmp_path):
    # curl -F image=@x.png (multipart/form-data), against curl --data-binary @x.png
    server = stub_server
    png = composed_numbers.png(test_digits[0][7].numpy())
    boundary = "----tinycnn"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    raw = http_request(server, "POST", "/predict", png)
    uploaded = http_request(server, "POST", "/predict", form,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert raw[0] == uploaded[0] == 200 and raw[1] == uploaded[1]
    empty = f"--{boundary}--\r\n".encode()
    status, answer = http_request(server, "POST", "/predict", empty,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "one file" in answer["error"]


def test_connections_over_the_bound_are_answered_503_at_once(tmp_path, untrained_folder, monkeypatch):
    from conftest import start_server, stop_server
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 3)
    srv = start_server(untrained_folder / "model.pt")
    try:
        held = [slow_client(srv.server_address[1]) for _ in range(3)]
        import time
        time.sleep(0.2)  # accepted and counted
        status, body = raw_request(srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status.startswith("HTTP/1.0 503") and "connections open" in body
        for s in held:
            s.close()
    finally:
        stop_server(srv)


@pytest.mark.parametrize("head, status", [
    (b"NONSENSE\r\n\r\n", 400),                                    # not a request line
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),          # a request line over 64 KiB
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),     # over 100 headers
    (b"GET / HTTP/2.0\r\n\r\n", 505),                              # a version it does not speak
    (b"POST /predict HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n", 400),  # "²": isdigit() yet no number
])
def test_every_refusal_is_json_the_standard_librarys_too(stub_server, head, status, capfd):
    server = stub_server  # the protocol: an untrained network answers as well as any
    import json
    line, body = raw_request(server, head)
    assert line.split()[1] == str(status) and "error" in json.loads(body)
    assert "Traceback" not in capfd.readouterr().err


def test_clients_that_go_away_mid_request_leave_no_traceback(stub_server, test_digits, tmp_path, capfd):
    server = stub_server  # the protocol: an untrained network answers as well as any
    import struct
    body = [p for p, _ in write_digit_variants(tmp_path, test_digits[0][:1], test_digits[1][:1])][1].read_bytes()
    port = server.server_address[1]
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    for _ in range(5):
        s = slow_client(port, head + body[:len(body) // 2])  # reset half-way through the body
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        s = slow_client(port, head + body)  # the whole request, gone before the answer
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    assert http_request(server, "GET", "/")[0] == 200  # still serving
    import time
    time.sleep(0.5)  # the handlers of the ones that left have finished
    assert capfd.readouterr().err == ""


def test_stopping_the_server_ends_slow_connections_within_a_second(untrained_folder):
    import time
    from conftest import start_server, stop_server
    srv = start_server(untrained_folder / "model.pt")
    slow = [slow_client(srv.server_address[1]) for _ in range(10)]
    time.sleep(0.2)
    start = time.monotonic()
    stop_server(srv)  # what Ctrl-C does: serve_command's server_close
    assert time.monotonic() - start < 1
    for s in slow:
        s.close()


def test_a_phone_photo_is_read_upright_from_its_exif_orientation(stub_server, test_digits, tmp_path):
    server = stub_server  # the protocol: an untrained network answers as well as any
    upright = Image.fromarray(255 - test_digits[0][0].numpy()).resize((280, 280))  # a 7, dark on white
    exif = Image.Exif()
    exif[digit_image.EXIF_ORIENTATION] = 6  # what a phone held upright writes: "turn 90 degrees clockwise to show"
    upright.save(tmp_path / "upright.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    expected = digit_tensor(tmp_path / "upright.png")
    assert torch.equal(digit_tensor(tmp_path / "sideways.png"), expected)
    _, answer = http_request(server, "POST", "/predict", (tmp_path / "sideways.png").read_bytes())
    assert answer["digit"] == http_request(server, "POST", "/predict", (tmp_path / "upright.png").read_bytes())[1]["digit"]


# --- the drawing page in a real headless Chromium (pytest -m browser) ---------------------------------------


@pytest.mark.slow
def test_server_reads_a_number_with_each_digits_box_and_refuses_more_than_12(server, test_digits):
    numbers = [n for n in composed_numbers.compose(test_digits[0].numpy(), test_digits[1].numpy(), 30, seed=5)
               if n[2] >= 4 and len(n[1]) >= 4][:3]
    right = 0
    for page, written, _ in numbers:
        status, answer = http_request(server, "POST", "/predict", composed_numbers.png(page))
        assert status == 200 and answer["number"] == "".join(str(d["digit"]) for d in answer["digits"])
        right += answer["number"] == written
        assert "digit" not in answer or len(answer["digits"]) == 1  # the one-digit fields: for one digit only
        for d in answer["digits"]:
            assert len(d["probabilities"]) == 10 and len(d["box"]) == 4
            assert d["preview"].startswith("data:image/png;base64,")
    assert right >= 2  # net-1epoch, one epoch: digits of numbers apart are read as it reads single digits
    row = np.concatenate([np.pad(test_digits[0][i].numpy(), ((4, 4), (4, 4))) for i in range(15)], axis=1)
    status, answer = http_request(server, "POST", "/predict", composed_numbers.png(row))
    assert status == 400 and re.search(r"1[3-5] digits found, more than the 12", answer["error"])


NO_TORCH = """import runpy, sys
sys.path.insert(0, {here!r})
sys.modules["torch"] = None  # `import torch` anywhere in this process fails
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path({main!r}, run_name="__main__")
"""


def serve_without_torch(*args):
    """`python main.py serve ARGS` in a fresh process in which torch cannot be imported."""
    code = NO_TORCH.format(here=HERE, main=os.path.join(HERE, "main.py"))
    return subprocess.Popen([sys.executable, "-c", code, "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_serve_onnx_runs_without_torch_and_answers_as_the_torch_path(ressenet_8epoch_onnx, ressenet_8epoch_run,
                                                                     test_digits, tmp_path):
    proc = serve_without_torch("--onnx", str(ressenet_8epoch_onnx[0]), "--port", "0")
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "onnxruntime, predicting with TTA" in lines[0] and lines[1].startswith("open http://127.0.0.1:"), lines
        port = int(lines[1].split(":")[2].split("/")[0])
        torch_path = serve.Predictor(reader.digit_reader(ressenet_8epoch_run[1], {"config": {"tta": True}}),
                                     shipped_row_reader())
        numbers = [n[0] for n in composed_numbers.compose(test_digits[0].numpy(), test_digits[1].numpy(), 4, seed=7)]
        bodies = [composed_numbers.png(255 - test_digits[0][i].numpy()) for i in range(12)] + \
            [composed_numbers.png(page) for page in numbers]
        for body in bodies:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/predict", body)
            answer = json.loads(connection.getresponse().read())
            connection.close()
            expected = torch_path(body)
            assert answer["number"] == expected["number"]
            for got, want in zip(answer["digits"], expected["digits"]):
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
                assert got["box"] == want["box"] and got["preview"] == want["preview"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == "" and out.strip() == "stopped"


def test_serve_onnx_refuses_a_file_that_is_not_a_digit_network_at_start(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    (tmp_path / "notes.onnx").write_text("not a model")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])])
    onnx.save(helper.make_model(graph), str(tmp_path / "rgb.onnx"))
    for name, message in (("notes.onnx", "not an ONNX model onnxruntime can load"),
                          ("rgb.onnx", "not one float batch (N, 1, 28, 28) of digits"),
                          ("missing.onnx", "no such file")):
        proc = serve_without_torch("--onnx", str(tmp_path / name), "--port", "0")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and out == "" and err.startswith(f"error: {tmp_path / name}: ") and \
            message in err and len(err.splitlines()) == 1, err

@pytest.mark.browser
def test_page_reads_50_real_test_digits_drawn_with_mouse_and_touch(page, test_digits, tmp_path):
    images, labels = test_digits
    right, times = 0, []
    for i in range(50):
        page.find_element("id", "clear").click()
        strokes = draw_digit(page, images[i].numpy(), touch=i % 5 == 0)  # every fifth by touch
        digit, error = wait_for_answer(page, strokes)
        assert error == "" and digit.isdigit()
        right += int(digit) == labels[i].item()
        times.append(float(page.execute_script("return document.body.dataset.ms")))
    print(f"page: {right}/50 drawn digits read right; one prediction's round trip from the page "
          f"{np.median(times):.1f} ms median, {max(times):.1f} ms max")
    assert right >= 45
    assert page.find_element("id", "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert all(page.find_element("id", f"bar{d}").is_displayed() for d in range(10))



@pytest.mark.browser
def test_page_reads_20_numbers_written_with_test_digits(page, test_digits, net_1epoch_checkpoint, rows, tmp_path):
    numbers = [n for n in composed_numbers.compose(test_digits[0].numpy(), test_digits[1].numpy(), 200, seed=6)
               if len(n[1]) <= 4 and n[2] >= 2][:20]
    model, _ = run_folder.load_checkpoint(net_1epoch_checkpoint)  # the network the page's server answers with
    right, as_file = 0, 0
    for k, (image, written, _) in enumerate(numbers):
        _, probs = reader.read_number(model, False, rows, io.BytesIO(composed_numbers.png(image)))
        from_file = "".join(str(d) for d in probs.argmax(1))
        page.find_element("id", "clear").click()
        ys, xs = np.nonzero(image)
        crop = Image.fromarray(np.pad(image[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 2))
        # 20 rows, a stroke along each: the pen is a little wider than a row, as in the test above
        image = np.asarray(crop.resize((round(crop.width * 20 / crop.height), 20), Image.BOX)) > 60
        image = image.astype(np.uint8) * 255  # every pixel the ink crosses: a thin stroke stays whole
        strokes = draw_digit(page, image, touch=k % 4 == 0)
        number, error = wait_for_answer(page, strokes)
        assert error == "" and number.isdigit()
        right += number == written
        as_file += len(number) == len(from_file)  # drawn, the number has the digits its file has
        cells = page.find_elements("css selector", "#digits .cell")
        assert len(cells) == len(number) and all(c.is_displayed() for c in cells)
        assert len(page.find_elements("css selector", "#digits .cell.unsure")) == (len(number) > 1)
    print(f"page: {right}/20 written numbers read exactly, {as_file}/20 with as many digits as read from their file")
    assert right >= 15 and as_file == 20  # net-1epoch, one epoch: 19 read exactly here (17 by cutting the ink first)
    shot = tmp_path / "draw.png"
    page.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    if os.environ.get("SCREENSHOT"):  # the README's picture: SCREENSHOT=docs/draw.png pytest -m browser
        shutil.copy(shot, os.environ["SCREENSHOT"])


@pytest.mark.browser
def test_undo_takes_back_the_last_stroke(page, test_digits):
    from selenium.webdriver.common.action_chains import ActionChains
    images, labels = test_digits
    one = next(i for i in range(100) if labels[i] == 1)
    strokes = draw_digit(page, images[0].numpy())  # a 7
    wait_for_answer(page, strokes)
    canvas = page.find_element("id", "pad")
    ActionChains(page).move_to_element_with_offset(canvas, 200, -30).click_and_hold().move_by_offset(0, 60) \
        .release().perform()  # a stray stroke to the right
    wait_for_answer(page, strokes + 1)
    page.find_element("id", "undo").click()
    number, _ = wait_for_answer(page, strokes)
    assert number == "7"
    for _ in range(strokes):
        page.find_element("id", "undo").click()
    assert page.find_element("id", "hint").is_displayed() and not page.find_element("id", "result").is_displayed()
    assert not page.find_element("id", "undo").is_enabled()
    strokes = draw_digit(page, images[one].numpy())
    number, _ = wait_for_answer(page, strokes)
    assert number == "1"

@pytest.mark.browser
def test_empty_canvas_shows_the_hint_and_clear_clears(page, test_digits):
    hint, result = page.find_element("id", "hint"), page.find_element("id", "result")
    assert hint.is_displayed() and not result.is_displayed()  # an empty canvas: never a prediction
    strokes = draw_digit(page, test_digits[0][0].numpy())
    wait_for_answer(page, strokes)
    assert result.is_displayed() and not hint.is_displayed()
    page.find_element("id", "clear").click()
    assert hint.is_displayed() and not result.is_displayed()
    white = page.execute_script(
        "const c = document.getElementById('pad'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return d.every(v => v === 255);")
    assert white


@pytest.mark.browser
def test_a_server_error_shows_as_a_message_on_the_page(page, server, test_digits, monkeypatch):
    def broken(body):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server, "predictor", broken)
    strokes = draw_digit(page, test_digits[0][1].numpy())
    digit, error = wait_for_answer(page, strokes)
    assert "server failed" in error and "out of memory" in error
    assert not page.find_element("id", "result").is_displayed()


@pytest.mark.browser
def test_page_fits_a_phone_sized_window(page, test_digits):
    page.set_window_size(390, 844)
    try:
        page.refresh()
        strokes = draw_digit(page, test_digits[0][2].numpy(), touch=True)
        digit, _ = wait_for_answer(page, strokes)
        assert digit.isdigit()
        width = page.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1]  # nothing wider than the screen: no sideways scrolling
        assert page.find_element("id", "bar9").is_displayed()
    finally:
        page.set_window_size(1000, 800)


@pytest.mark.browser
def test_an_answer_for_a_cleared_drawing_never_shows(page, server, monkeypatch):
    import threading
    import time
    calls, real = [], server.predictor

    def slow_first(body):  # the first drawing's answer arrives after the second's
        calls.append(1)
        answer = dict(real(body), number=str(len(calls)))
        if len(calls) == 1:
            time.sleep(1.5)
        return answer

    monkeypatch.setattr(server, "predictor", slow_first)
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = page.find_element("id", "pad")

    def one_stroke(dy):
        ActionChains(page).move_to_element_with_offset(canvas, -40, dy).click_and_hold().move_by_offset(80, 0) \
            .release().perform()

    one_stroke(0)  # the first drawing: one stroke, its answer on its way
    page.find_element("id", "clear").click()
    one_stroke(30)  # the second: one stroke too, so only the count of requests tells the answers apart
    digit, _ = wait_for_answer(page, 1)
    assert digit == "2" and len(calls) == 2
    threading.Event().wait(2.0)  # the first drawing's answer has arrived by now, and was dropped
    assert page.find_element("id", "number").text == digit


@pytest.mark.browser
def test_the_drawing_survives_a_resize_and_the_page_has_its_own_icon(page, test_digits):
    ink = "const c = document.getElementById('pad'); const d = c.getContext('2d').getImageData(0, 0, c.width, " \
          "c.height).data; let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] < 128; return [n, c.width];"
    try:
        strokes = draw_digit(page, test_digits[0][4].numpy())
        wait_for_answer(page, strokes)
        before, width = page.execute_script(ink)
        page.set_window_size(300, 700)  # the canvas shrinks with the window (min(92vw, 780px))
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(page, 10).until(lambda d: d.execute_script(ink)[1] != width)
        after, new_width = page.execute_script(ink)
        assert after > 0.5 * before * (new_width / width) ** 2  # the same strokes, scaled to the new size
        assert page.find_element("id", "number").text != ""
    finally:
        page.set_window_size(1000, 800)
    icon = page.find_element("css selector", "link[rel=icon]").get_attribute("href")
    assert icon.startswith("data:image/svg+xml")  # drawn inline: no request for /favicon.ico


# --- the static site (main.py export --web) in the browser -----------------------------------------------------

def static_server(folder, asked=None):
    """The standard library's static file server on `folder`, as any static host would serve it, in a thread of
    its own; the paths the browser asks for go to `asked`."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            if asked is not None:
                asked.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="session")
def static_site(net_1epoch_checkpoint, tmp_path_factory):
    """`python main.py export RUN --web DIR` of the net-1epoch run, served by the standard library's static file
    server as any static host would: (its address, the ONNX file, the paths the browser asked for)."""
    folder = tmp_path_factory.mktemp("web")
    code = main.main(["export", str(net_1epoch_checkpoint.parent), "--out", str(folder / "model.onnx"),
                      "--web", str(folder / "site"), "--data-dir", DATA_DIR])
    assert code == 0
    asked = []
    srv = static_server(folder / "site", asked)
    yield f"http://127.0.0.1:{srv.server_address[1]}/", folder / "model.onnx", asked
    srv.shutdown()
    srv.server_close()


@pytest.mark.browser
def test_static_site_prepares_and_reads_as_python_does(browser, static_site, net_1epoch_checkpoint, test_digits,
                                                       rows):
    import onnx_model
    url, onnx_path, asked = static_site
    browser.get(url)
    row_runner = onnx_model.OnnxRows(str(onnx_path.with_name("rows.onnx")))
    model, _ = run_folder.load_checkpoint(net_1epoch_checkpoint)
    images, labels = test_digits
    right, worst = 0, 0.0
    for i in range(50):
        browser.find_element("id", "clear").click()
        strokes = draw_digit(browser, images[i].numpy(), touch=i % 5 == 0)
        number, error = wait_for_answer(browser, strokes)
        assert error == "" and number.isdigit()
        png = base64.b64decode(browser.execute_script("return document.getElementById('pad').toDataURL()")
                               .split(",")[1])
        ours = np.array(browser.execute_script("return window.lastInputs"), dtype=np.float32).reshape(-1, 28, 28)
        python = digit_image.read_digits(io.BytesIO(png), row_runner.row_frames, "the canvas").digits
        assert ours.shape == python.shape
        worst = max(worst, float(np.abs(ours - python).max()) * digit_image.STD)  # in pixels of 0..1
        _, probs = reader.read_number(model, False, rows, io.BytesIO(png))  # predict's own path, torch
        assert number == "".join(str(d) for d in probs.argmax(1))
        right += number == str(labels[i].item())
    print(f"static site: {right}/50 drawn digits read right; its 28x28 inputs within {worst * 255:.3f}/255 of "
          "Python's")
    assert worst <= 1 / 255 and right >= 45
    assert all(not path.startswith("http") for path in asked) and {"/model.onnx", "/rows.onnx"} <= set(asked)
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(url) for u in origins), origins  # nothing fetched from anywhere else


@pytest.mark.browser
def test_the_static_site_reads_a_letter_among_digits_as_a_question_mark_as_python_does(
        browser, static_site, net_1epoch_checkpoint, test_digits, monkeypatch):
    # Numbers with a serif letter (held out of the row reader's training) among their digits, drawn on the static
    # site of the shipped row reader. With MARK_SURE over any probability, each mark the row reader finds is a ?.
    import not_digits
    import onnx_model
    url, onnx_path, _ = static_site
    monkeypatch.setattr(digit_image, "MARK_SURE", 1.5)
    rows = onnx_model.OnnxRows(str(onnx_path.with_name("rows.onnx"))).row_frames
    model, _ = run_folder.load_checkpoint(net_1epoch_checkpoint)
    images, labels = (t.numpy() for t in test_digits)
    marks = not_digits.as_uint8(np.stack([digit_image.read_digit(io.BytesIO(png))
                                          for png in not_digits.generate("letters, serif", 8, 9, images)]))
    browser.get(url)
    browser.execute_script("window.DIGIT_IMAGE.MARK_SURE = 1.5")
    questions = 0
    for page, written, _ in composed_numbers.with_marks(images, labels, marks, 3, seed=9):
        browser.find_element("id", "clear").click()
        number, error = wait_for_answer(browser, draw_digit(browser, page))
        png = base64.b64decode(browser.execute_script(
            "return document.getElementById('pad').toDataURL()").split(",")[1])
        reading, probs = reader.read_number(model, False, rows, io.BytesIO(png))
        python = digit_image.answer(reading, probs, previews=False)["number"]  # the ? as predict says it
        assert error == "" and number == python, (written, number, python)
        questions += "?" in number
    assert questions >= 2  # the letters were found as marks, and said as ? in their numbers


@pytest.mark.browser
def test_the_page_and_the_static_site_say_not_a_digit_and_grey_the_mark(browser, declining_folder, static_site,
                                                                        test_digits):
    srv = start_server(declining_folder / "model.pt")  # the server's answer, then digits.js's own
    try:
        for url in (f"http://127.0.0.1:{srv.server_address[1]}/", static_site[0]):
            browser.get(url)
            if url == static_site[0]:  # the site's network never declines: settings.js as a declining one's says
                browser.execute_script("window.DIGIT_IMAGE.THRESHOLD = 1.5")
            strokes = draw_digit(browser, test_digits[0][0].numpy())
            number, error = wait_for_answer(browser, strokes)
            assert (number, error) == ("not a digit", "") and browser.execute_script(
                "return document.body.dataset.number") == "?"
            cell = browser.find_element("css selector", "#digits .cell")
            assert "declined" in cell.get_attribute("class") and cell.find_element("tag name", "b").text == "?"
    finally:
        stop_server(srv)
