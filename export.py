"""The trained network out of this repository: ONNX, checked by onnxruntime on the 10,000 test digits, and int8.

    python main.py export runs/X                # runs/X/model.onnx
    python main.py export runs/X --int8         # and runs/X/model.int8.onnx, calibrated on training digits
    python main.py export runs/X --web site     # the page as a static site: python -m http.server -d site

The ONNX file takes a batch of normalised digits (N, 1, 28, 28) and gives log-probabilities (N, 10); the run's
config (JSON) and test accuracy are in its metadata, so `serve --onnx` knows whether to use TTA. Each file is
written to a temporary name and checked before it takes its own: the float model must give the same prediction
as torch on every test digit and log-probabilities within MAX_DIFFERENCE; the int8 model at most MAX_INT8_LOSS
points of test accuracy under the float one. A file that fails is removed and the export is an error.

The row reader goes beside it as rows.onnx (export_rows: checked against torch on composed test rows).
--web DIR writes a folder any static host serves: the page (draw.html as index.html), digits.js (digit_image's
reading in JavaScript, its constants in settings.js), both checked ONNX models, and onnxruntime-web's
runtime from the npm package ORT_WEB (fetched with npm; nothing is fetched from elsewhere when the page runs).
"""
import json
import os
import tempfile

import numpy as np
import torch

import data_file
import digit_image
import reader
import run_folder
from errors import UserError
from model import count_parameters

OPSET = 18
MAX_DIFFERENCE = 1e-4  # the largest |log-probability| difference from torch allowed on any test digit
MAX_INT8_LOSS = 0.5  # points of test accuracy an int8 model may lose before the export refuses it
CALIBRATION = 1000  # training digits that calibrate the int8 ranges (never test digits)
ORT_WEB = "onnxruntime-web@1.30.0"
ORT_WEB_FILES = ["dist/ort.wasm.min.js", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm",
                 "package.json"]  # its package.json names its version and licence (MIT)
HERE = os.path.dirname(os.path.abspath(__file__))


class ExportError(UserError):
    """The network could not be exported, or the export does not compute what the checkpoint does."""


def onnx_bytes(model, metadata, rows=False):
    """The network as an ONNX model (bytes): torch.onnx's exporter, `metadata` as strings. A digit network takes
    "digits" (N, 1, 28, 28), a dynamic batch, and gives "log_probs"; a row reader (rows=True) takes "rows"
    (N, 1, 32, W), W any even width, and gives "frames" (N, 11 or 12, W / 2)."""
    import onnx
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if rows:
        half = torch.export.Dim("half", min=4, max=digit_image.ROW_MAX_WIDTH // 2)
        example, names, shapes = torch.zeros(2, 1, digit_image.ROW_HEIGHT, 64), (["rows"], ["frames"]), \
            ({0: batch, 3: 2 * half},)
    else:
        example, names, shapes = torch.zeros(2, 1, 28, 28), (["digits"], ["log_probs"]), ({0: batch},)
    with tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=names[0],
                                    output_names=names[1], dynamic_shapes=shapes, verbose=False)
        program.optimize()
        path = os.path.join(tmp, "model.onnx")
        program.save(path)
        proto = onnx.load(path)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return compact(proto)


def export_rows(model, checkpoint, out, data_dir="./data", count=200):
    """Write the row reader `model` as ONNX at `out`, checked against torch on `count` rows composed from the
    test digits: the same digits read in every row, frames within MAX_DIFFERENCE. Returns {"bytes", "rows",
    "difference"}."""
    import onnx_model
    import row_train
    data_file.ensure_mnist(data_dir)
    images, labels = (t.numpy() for t in data_file.read_split(data_dir, "test"))
    rows = [digit_image.row_input(ink)[0] for ink, _ in row_train.composed_rows(images, labels, count, 0)]
    model = reader.as_predict_runs(model)
    result = {}

    def check(path):
        runner, torch_frames = onnx_model.OnnxRows(path), reader.row_reader(model)
        difference, same = 0.0, 0
        for row in rows:
            expected, got = torch_frames(row), runner.row_frames(row)
            difference = max(difference, float(np.abs(expected - got).max()))
            same += digit_image.greedy_digits(expected) == digit_image.greedy_digits(got)
        if same != len(rows) or difference > MAX_DIFFERENCE:
            raise ExportError(f"the row reader's ONNX model does not compute what the checkpoint does: {same} of "
                              f"{len(rows)} rows read the same, frames up to {difference:.2e} apart")
        result.update(bytes=os.path.getsize(path), rows=len(rows), difference=difference)

    metadata = {"config": json.dumps(checkpoint.get("config") or {}), "model_name": checkpoint["model_name"],
                "parameters": str(count_parameters(model))}
    try:
        write_checked(out, onnx_bytes(model, metadata, rows=True), check)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx could not export the row reader: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    return result


def compact(proto):
    """An ONNX model's bytes without what only a reader of its graph needs: the exporter's notes on each node
    (source lines), node names, intermediate shapes, and long tensor names (renamed t0, t1, ...; the input and
    output keep theirs), the exporter's and the quantizer's notes, and unused opset domains. Over half of a small
    network's file."""
    graph = proto.graph
    keep = {v.name for v in list(graph.input) + list(graph.output)}
    names = {}

    def short(name):
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string, node.name = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    del graph.metadata_props[:]  # the exporter's record of the torch program: 4.5 KB of parameter names
    props = [p for p in proto.metadata_props if not p.key.startswith("onnx.")]  # the quantizer's tool notes
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    used = {node.domain for node in graph.node} | {""}
    opsets = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    proto.doc_string = ""
    return proto.SerializeToString()


def write_checked(path, data, check):
    """run_folder.atomic_write of `data`, given its name only once check(temporary path) passes (it raises
    ExportError for a file that is wrong); a folder that cannot be written to is an ExportError too."""
    try:
        run_folder.atomic_write(path, lambda f: f.write(data), check)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None


def test_scores(onnx_path, images, tta):
    """(predictions (N,), log-probabilities (N, 10), accuracy inputs) of an ONNX file on normalised images."""
    import onnx_model
    runner = onnx_model.OnnxModel(onnx_path)
    logs = np.concatenate([runner.log_probs(images[i:i + 1000]) for i in range(0, len(images), 1000)])
    probs = None
    if tta:
        probs = np.concatenate([runner.probabilities(images[i:i + 1000, 0], tta=True)
                                for i in range(0, len(images), 1000)])
    return logs, probs


def calibration_reader(images):
    """An onnxruntime CalibrationDataReader over training digits (N, 1, 28, 28), 100 at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"digits": images[i:i + 100]} for i in range(0, len(images), 100)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def int8_bytes(float_path, calibration):
    """The float ONNX file quantized to int8 by onnxruntime (static, per-channel weights), as bytes. In the
    operator format (QLinearConv, QGemm, ...: one node per quantized operation, the kernels onnxruntime's CPU
    runs either way) rather than QDQ pairs: 14 KB for the 3,482-parameter network against 19 KB."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "int8.onnx")
        quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, quantized, calibration_reader(calibration), quant_format=QuantFormat.QOperator,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return compact(onnx.load(quantized))


def export(model, checkpoint, out, int8=False, data_dir="./data", log=print):
    """Write `out` (ONNX) and, with int8, its int8 twin beside it (NAME.int8.onnx), each checked on the test set.
    Returns {"float": {...}, "int8": {...}} of what the checks measured."""
    config = checkpoint.get("config") or {"model": checkpoint["model_name"]}
    tta = reader.checkpoint_tta(checkpoint)
    metrics = checkpoint.get("metrics") or {}
    metadata = {"config": json.dumps(config), "model_name": checkpoint["model_name"],
                "parameters": str(count_parameters(model)),
                "test_acc": str(metrics.get("test_acc", "")), "test_acc_tta": str(metrics.get("test_acc_tta", "")),
                "threshold": str(reader.decline_threshold(model))}  # under it: "not a digit" (onnx_model)
    data = data_file.load_mnist(data_dir, log=log)
    images, labels = data["test"]
    model = reader.as_predict_runs(model)
    with torch.inference_mode():
        expected = torch.cat([model(images[i:i + 1000]) for i in range(0, len(images), 1000)]).numpy()
    x, y = images.numpy(), labels.numpy()
    results = {}

    def check_float(path):
        logs, probs = test_scores(path, x, tta)
        difference = float(np.abs(logs - expected).max())
        same = int((logs.argmax(1) == expected.argmax(1)).sum())
        if same != len(y) or difference > MAX_DIFFERENCE:
            raise ExportError(f"the ONNX model does not compute what the checkpoint does: {same:,} of {len(y):,} "
                              f"test predictions the same, log-probabilities up to {difference:.2e} apart")
        results["float"] = scores(path, logs, probs, y, same=same, difference=difference)

    try:
        log(f"exporting with torch.onnx, then checking with onnxruntime on the {len(y):,} test digits...")
        write_checked(out, onnx_bytes(model, metadata), check_float)
    except ExportError:
        raise
    except Exception as e:  # the exporter's own failures, in one line
        raise ExportError(f"torch.onnx could not export the {checkpoint['model_name']!r} network: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
    if int8:
        calibration = data["train"][0][:CALIBRATION].numpy()  # training digits, in their stored order

        def check_int8(path):
            logs, probs = test_scores(path, x, tta)
            results["int8"] = scores(path, logs, probs, y)
            lost = results["float"]["acc"] - results["int8"]["acc"]
            if lost > MAX_INT8_LOSS:
                raise ExportError(f"int8 loses {lost:.2f} points of test accuracy (at most {MAX_INT8_LOSS})")

        log(f"quantizing to int8 (calibrated on {CALIBRATION:,} training digits), then checking it...")
        write_checked(int8_path(out), int8_bytes(out, calibration), check_int8)
    return results


def int8_path(out):
    root, ext = os.path.splitext(out)
    return f"{root}.int8{ext or '.onnx'}"


def result_lines(result, out):
    """What `export` prints of export()'s result: each file's size and test accuracy, and the float file's
    agreement with torch."""
    for kind, name in (("float", out), ("int8", int8_path(out))):
        if kind in result:
            r = result[kind]
            yield (f"{name}: {r['bytes']:,} bytes, test accuracy {r['acc']:.2f}%"
                   + (f", {r['acc_tta']:.2f}% with TTA" if "acc_tta" in r else "")
                   + (f"; the same prediction as torch on {r['same']:,} of 10,000 test digits, log-probabilities "
                      f"within {r['difference']:.1e}" if kind == "float" else ""))


def scores(path, logs, probs, labels, **extra):
    """{"bytes", "acc", "acc_tta"?} of one checked file, with `extra`."""
    result = {"bytes": os.path.getsize(path), "acc": 100 * float((logs.argmax(1) == labels).mean()), **extra}
    if probs is not None:
        result["acc_tta"] = 100 * float((probs.argmax(1) == labels).mean())
    return result


def web_settings(config, threshold=0.0):
    """settings.js: digit_image's constants, the run's TTA and the confidence under which its network declines
    (THRESHOLD), for digits.js (declared once, in Python)."""
    names = ("MEAN", "STD", "MAX_SIDE", "MAX_DIGITS", "INK", "SPECK", "OWN_SHARE", "MARK_SURE", "UNSURE",
             "ROW_WEIGHT", "ONE_DIGIT_WIDTH", "ROW_HEIGHT", "ROW_INK", "ROW_MARGIN", "ROW_MAX_WIDTH", "ROW_FRAME", "MARK",
             "TTA_SHIFTS")
    settings = {name: getattr(digit_image, name) for name in names}
    settings["TTA"] = bool(config.get("tta"))
    settings["THRESHOLD"] = threshold
    return f"window.DIGIT_IMAGE = {json.dumps(settings)};\n"


def refuse_existing(folder):
    if os.path.exists(folder):
        raise ExportError(f"{folder} exists already: name a new folder for the site")


def export_lines(path, model, checkpoint, rows, out=None, int8=False, web=None, data_dir="./data", log=print):
    """Do what `python main.py export` does and yield what it prints: the checkpoint at `path` as ONNX at `out`
    (None: model.onnx beside it), with `int8` its quantized copy, the row reader `rows` ((path, model,
    checkpoint), run_folder.load_row_reader) as rows.onnx beside it, and with `web` the static site in that
    folder."""
    import onnx_model
    out = out or os.path.join(os.path.dirname(path) or ".", "model.onnx")
    if web:  # before minutes of work, not after
        refuse_existing(web)
        data_file.need_npm(ORT_WEB, ExportError)
    yield from result_lines(export(model, checkpoint, out, int8=int8, data_dir=data_dir, log=log), out)
    rows_out = os.path.join(os.path.dirname(out) or ".", onnx_model.ROWS_FILE)
    result = export_rows(rows[1], rows[2], rows_out, data_dir)
    yield (f"{rows_out}: the row reader ({rows[0]}), {result['bytes']:,} bytes; the same digits as torch in "
           f"{result['rows']} of {result['rows']} composed test rows, frames within {result['difference']:.1e}")
    if web:
        site_model = int8_path(out) if int8 else out  # the page runs the smaller model when there is one
        export_web(site_model, rows_out, checkpoint.get("config") or {}, web, reader.decline_threshold(model))
        yield (f"{web}/: the page as a static site, with {os.path.basename(site_model)} and "
               f"{onnx_model.ROWS_FILE} (python -m http.server -d {web} --bind 127.0.0.1, then open its address)")


def export_web(onnx_path, rows_path, config, folder, threshold=0.0):
    """The static site in `folder` (made whole in a temporary folder beside it, then renamed; refused if it
    exists): index.html, digits.js, settings.js, model.onnx, rows.onnx and onnxruntime-web. `threshold`: the
    confidence under which the network declines (reader.decline_threshold)."""
    import shutil
    refuse_existing(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    try:
        tmp = tempfile.mkdtemp(prefix=".web-", dir=parent)
    except OSError as e:
        raise ExportError(f"cannot write {folder}: {e.strerror or e}") from None
    try:
        data_file.npm_files(ORT_WEB, ORT_WEB_FILES, tmp, error=ExportError)
        os.replace(os.path.join(tmp, "package.json"), os.path.join(tmp, "onnxruntime-web-package.json"))
        with open(os.path.join(HERE, "draw.html")) as f:
            page = f.read()
        scripts = '<script src="settings.js"></script>\n<script src="ort.wasm.min.js"></script>\n' \
                  '<script src="digits.js"></script>\n<script>'
        assert page.count("<script>") == 1
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write(page.replace("<script>", scripts))
        with open(os.path.join(tmp, "settings.js"), "w") as f:
            f.write(web_settings(config, threshold))
        shutil.copy(os.path.join(HERE, "digits.js"), tmp)
        shutil.copy(onnx_path, os.path.join(tmp, "model.onnx"))
        shutil.copy(rows_path, os.path.join(tmp, "rows.onnx"))
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
