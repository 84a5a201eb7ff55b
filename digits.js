// The static page's reader: digit_image.py's preparation in JavaScript, and the network run by onnxruntime-web.
// `python main.py export RUN --web DIR` puts this file beside draw.html, the ONNX model and onnxruntime-web, and
// writes digit_image's constants into DIR/settings.js (window.DIGIT_IMAGE), so both paths use the same numbers.
// Each step below is the Python function of the same name; the page's 28x28 inputs equal Python's to 1/255.
"use strict";
(() => {
const S = window.DIGIT_IMAGE;  // MEAN, STD, INK, SPECK, OWN_SHARE, ROW_HEIGHT, ROW_INK, ROW_MARGIN, ...

function roundHalfEven(x) {  // Python's round()
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function decode(canvas) {
  // digit_image.decode of the canvas's PNG: reduced by a box filter over MAX_SIDE, then greyscale in [0, 1]
  let {width: w, height: h} = canvas;
  let rgba = canvas.getContext("2d").getImageData(0, 0, w, h).data;
  let gray = new Float32Array(w * h);
  for (let i = 0; i < w * h; i++) {  // Pillow's RGB -> L, on white (the canvas is opaque)
    gray[i] = ((rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >> 16);
  }
  let scale = 1;
  const factor = Math.ceil(Math.max(w, h) / S.MAX_SIDE);
  if (factor > 1) {  // Image.reduce(factor): the mean of each factor x factor box, the edge boxes smaller
    const rw = Math.ceil(w / factor), rh = Math.ceil(h / factor), out = new Float32Array(rw * rh);
    for (let y = 0; y < rh; y++) for (let x = 0; x < rw; x++) {
      let sum = 0, n = 0;
      for (let yy = y * factor; yy < Math.min(h, (y + 1) * factor); yy++)
        for (let xx = x * factor; xx < Math.min(w, (x + 1) * factor); xx++) { sum += gray[yy * w + xx]; n++; }
      out[y * rw + x] = Math.round(sum / n);
    }
    scale = w / rw;
    gray = out; w = rw; h = rh;
  }
  for (let i = 0; i < gray.length; i++) gray[i] = Math.fround(gray[i] / 255);
  return {gray, w, h, scale};
}

function inkOf(gray, w, h) {
  const border = [];
  for (let x = 0; x < w; x++) border.push(gray[x]);
  for (let x = 0; x < w; x++) border.push(gray[(h - 1) * w + x]);
  for (let y = 0; y < h; y++) border.push(gray[y * w]);
  for (let y = 0; y < h; y++) border.push(gray[y * w + w - 1]);
  border.sort((a, b) => a - b);
  const m = border.length >> 1;
  let b = Math.fround(border.length % 2 ? border[m] : (border[m - 1] + border[m]) / 2);
  const ink = new Float32Array(gray.length);
  const light = b > 0.5;
  if (light) b = Math.fround(1 - b);
  let max = 0;
  for (let i = 0; i < gray.length; i++) {
    const g = light ? Math.fround(1 - gray[i]) : gray[i];
    ink[i] = Math.max(0, Math.fround(g - b));
    max = Math.max(max, ink[i]);
  }
  if (max < 0.1) throw new Error("the drawing: blank image, no digit found");
  for (let i = 0; i < ink.length; i++) ink[i] = Math.fround(ink[i] / max);
  return ink;
}

function resizeWeights(nIn, nOut) {
  const scale = nIn / nOut, support = Math.max(scale, 1), rows = [];
  for (let i = 0; i < nOut; i++) {
    const centre = (i + 0.5) * scale;
    const lo = Math.max(Math.trunc(centre - support + 0.5), 0), hi = Math.min(Math.trunc(centre + support + 0.5), nIn);
    const w = [];
    let total = 0;
    for (let j = lo; j < hi; j++) { const v = Math.max(0, 1 - Math.abs((j + 0.5 - centre) / support)); w.push(v); total += v; }
    rows.push({lo, w: w.map(v => v / total)});
  }
  return rows;
}

function centred(ink, w, h) {
  // digit_image.centred: cropped to the ink, the longer side to 20 px, centred by mass in 28x28, normalised
  let x0 = w, x1 = -1, y0 = h, y1 = -1;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if (ink[y * w + x] > S.INK) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  const ch = y1 - y0 + 1, cw = x1 - x0 + 1, scale = 20 / Math.max(ch, cw);
  const oh = Math.max(1, roundHalfEven(ch * scale)), ow = Math.max(1, roundHalfEven(cw * scale));
  const wy = resizeWeights(ch, oh), wx = resizeWeights(cw, ow);
  const rows = new Float64Array(oh * cw);  // (wy @ a)
  for (let i = 0; i < oh; i++) for (let x = 0; x < cw; x++) {
    let s = 0;
    wy[i].w.forEach((v, k) => { s += v * ink[(y0 + wy[i].lo + k) * w + x0 + x]; });
    rows[i * cw + x] = s;
  }
  const a = new Float32Array(oh * ow);  // (wy @ a @ wx.T), as float32, clipped
  for (let i = 0; i < oh; i++) for (let j = 0; j < ow; j++) {
    let s = 0;
    wx[j].w.forEach((v, k) => { s += rows[i * cw + wx[j].lo + k] * v; });
    a[i * ow + j] = Math.min(1, Math.max(0, Math.fround(s)));
  }
  let mass = 0, my = 0, mx = 0;
  for (let i = 0; i < oh; i++) for (let j = 0; j < ow; j++) { mass += a[i * ow + j]; my += i * a[i * ow + j]; mx += j * a[i * ow + j]; }
  const top = Math.min(Math.max(roundHalfEven(13.5 - my / mass), 0), 28 - oh);
  const left = Math.min(Math.max(roundHalfEven(13.5 - mx / mass), 0), 28 - ow);
  const mean = Math.fround(S.MEAN), std = Math.fround(S.STD);  // numpy's float32 arithmetic
  const out = new Float32Array(784).fill(Math.fround(Math.fround(0 - mean) / std));
  for (let i = 0; i < oh; i++) for (let j = 0; j < ow; j++)
    out[(top + i) * 28 + left + j] = Math.fround(Math.fround(a[i * ow + j] - mean) / std);
  return out;
}

function ownInk(ink, mask, w, h) {  // ink within one pixel of the mask's strokes
  const out = new Float32Array(ink.length);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    let near = false;
    for (let dy = -1; dy <= 1 && !near; dy++) for (let dx = -1; dx <= 1 && !near; dx++) {
      const yy = y + dy, xx = x + dx;
      near = yy >= 0 && yy < h && xx >= 0 && xx < w && mask[yy * w + xx] === 1;
    }
    if (near) out[y * w + x] = ink[y * w + x];
  }
  return out;
}

function linesOf(mask, w, h) {
  const rows = [];
  for (let y = 0; y < h; y++) { for (let x = 0; x < w; x++) if (mask[y * w + x]) { rows.push(y); break; } }
  const bands = [[rows[0], rows[0] + 1]];
  for (const r of rows.slice(1)) { const b = bands[bands.length - 1]; if (r === b[1]) b[1] = r + 1; else bands.push([r, r + 1]); }
  const merged = [bands[0]];
  for (const [top, bottom] of bands.slice(1)) {
    const last = merged[merged.length - 1], gap = top - last[1], tall = Math.max(bottom - top, last[1] - last[0]);
    if (gap < tall / 3) last[1] = bottom; else merged.push([top, bottom]);
  }
  return merged;
}

function label(mask, w, h) {  // scipy.ndimage.label with 8-connectivity: labels 1.. in raster order
  const labels = new Int32Array(w * h);
  let count = 0;
  for (let start = 0; start < w * h; start++) {
    if (!mask[start] || labels[start]) continue;
    labels[start] = ++count;
    const stack = [start];
    while (stack.length) {
      const p = stack.pop(), y = Math.floor(p / w), x = p % w;
      for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
        const yy = y + dy, xx = x + dx, q = yy * w + xx;
        if (yy >= 0 && yy < h && xx >= 0 && xx < w && mask[q] && !labels[q]) { labels[q] = count; stack.push(q); }
      }
    }
  }
  return {labels, count};
}

function rowInput(ink, w, h) {
  // digit_image.row_input: the ink cropped to its box, scaled to ROW_INK px high, between margins, normalised
  let x0 = w, x1 = -1, y0 = h, y1 = -1;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) if (ink[y * w + x] > S.INK) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  const ch = y1 - y0 + 1, cw = x1 - x0 + 1;
  const scale = Math.min(S.ROW_INK / ch, (S.ROW_MAX_WIDTH - 2 * S.ROW_MARGIN) / cw);
  const oh = Math.max(1, roundHalfEven(ch * scale)), ow = Math.max(1, roundHalfEven(cw * scale));
  const wy = resizeWeights(ch, oh), wx = resizeWeights(cw, ow);
  const rows = new Float64Array(oh * cw);
  for (let i = 0; i < oh; i++) for (let x = 0; x < cw; x++) {
    let s = 0;
    wy[i].w.forEach((v, k) => { s += v * ink[(y0 + wy[i].lo + k) * w + x0 + x]; });
    rows[i * cw + x] = s;
  }
  const width = ow + 2 * S.ROW_MARGIN + (ow % 2), top = Math.floor((S.ROW_HEIGHT - oh) / 2);
  const mean = Math.fround(S.MEAN), std = Math.fround(S.STD);
  const row = new Float32Array(S.ROW_HEIGHT * width).fill(Math.fround(Math.fround(0 - mean) / std));
  for (let i = 0; i < oh; i++) for (let j = 0; j < ow; j++) {
    let s = 0;
    wx[j].w.forEach((v, k) => { s += rows[i * cw + wx[j].lo + k] * v; });
    const a = Math.fround(Math.min(1, Math.max(0, s)));
    row[(top + i) * width + S.ROW_MARGIN + j] = Math.fround(Math.fround(a - mean) / std);
  }
  return {row, width, x0, scale};
}

function greedyDigits(frames, t) {  // digit_image.greedy_digits: frames (11 or 12 x t) -> [[digit, first, last]]
  const best = [], classes = frames.length / t;  // blank, 0-9 (, a mark: S.MARK)
  for (let j = 0; j < t; j++) {
    let c = 0;
    for (let k = 1; k < classes; k++) if (frames[k * t + j] > frames[c * t + j]) c = k;
    best.push(c);
  }
  const found = [];
  best.forEach((c, j) => {
    if (c === 0) return;
    if (j > 0 && best[j - 1] === c) found[found.length - 1][2] = j; else found.push([c - 1, j, j]);
  });
  return found;
}

function rowProbabilities(frames, t, first, last) {  // digit_image.row_probabilities
  const p = [];
  for (let k = 1; k < 11; k++) { let s = 0; for (let j = first; j <= last; j++) s += Math.exp(frames[k * t + j]); p.push(s / (last - first + 1)); }
  const total = p.reduce((a, b) => a + b, 0);
  return p.map(v => v / total);
}

function oneLine(ink, w, h) {  // digit_image.one_line
  const mask = new Uint8Array(ink.length);
  for (let i = 0; i < ink.length; i++) mask[i] = ink[i] > S.INK ? 1 : 0;
  const lines = linesOf(mask, w, h);
  if (lines.length === 1) return {mask, note: ""};
  const weight = lines.map(([t, b]) => { let s = 0; for (let i = t * w; i < b * w; i++) s += ink[i]; return s; });
  const pick = weight.indexOf(Math.max(...weight));
  for (let i = 0; i < mask.length; i++) if (i < lines[pick][0] * w || i >= lines[pick][1] * w) mask[i] = 0;
  return {mask, note: `${lines.length} lines of writing: read the one with the most ink (line ${pick + 1} from the top)`};
}

async function rowDigits(ink, w, h) {
  // digit_image.row_digits: the row reader says how many digits and where; the ink is parted between them
  const {mask, note} = oneLine(ink, w, h);
  const lineInk = ink.map((v, i) => mask[i] ? v : 0);
  const {row, width, x0, scale} = rowInput(lineInk, w, h);
  const frames = await rowFrames(row, width), t = width / S.ROW_FRAME;
  const found = greedyDigits(frames, t);
  if (found.length <= 1) {
    return {masks: [mask], note, rowProbs: [found.length ? rowProbabilities(frames, t, found[0][1], found[0][2]) : Array(10).fill(0.1)], cut: [false],
            marked: [found.length > 0 && found[0][0] === S.MARK]};
  }
  const centres = found.map(([, a, b]) => x0 + (a + b + 1 - S.ROW_MARGIN) / scale);
  const columns = new Float64Array(w), last = w - 1;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) columns[x] += lineInk[y * w + x];
  const partings = [];
  for (let k = 0; k + 1 < centres.length; k++) {
    const left = centres[k], right = centres[k + 1], middle = (left + right) / 2;
    const lo = Math.min(Math.max(Math.trunc(left + 0.2 * (right - left)), 1), last);
    const hi = Math.min(Math.max(Math.ceil(right - 0.2 * (right - left)), lo), last);
    let best = lo;
    for (let x = lo + 1; x <= hi; x++) {
      if (columns[x] < columns[best] || (columns[x] === columns[best] && Math.abs(x - middle) < Math.abs(best - middle))) best = x;
    }
    partings.push(best);
  }
  const edges = [0, ...partings, w];
  const slotOf = x => { let s = 0; while (s < partings.length && x >= partings[s]) s++; return s; };
  const {labels, count} = label(mask, w, h);
  const masses = new Float64Array(count + 1);
  for (let i = 0; i < labels.length; i++) if (labels[i]) masses[labels[i]] += lineInk[i];
  const heaviest = Math.max(...masses.slice(1));
  const perSlot = Array.from({length: count + 1}, () => new Float64Array(found.length));
  for (let i = 0; i < labels.length; i++) if (labels[i]) perSlot[labels[i]][slotOf(i % w)] += lineInk[i];
  const masks = found.map(() => new Uint8Array(w * h)), cut = found.map(() => false);
  const whole = new Int32Array(count + 1).fill(-1);  // the digit a piece wholly belongs to; -1: cut at the partings
  for (let k = 1; k <= count; k++) {
    if (masses[k] < S.SPECK * heaviest) { whole[k] = -2; continue; }
    const share = perSlot[k], top = share.indexOf(Math.max(...share));
    if (share[top] >= S.OWN_SHARE * share.reduce((a, b) => a + b, 0)) whole[k] = top;
  }
  for (let i = 0; i < labels.length; i++) {
    const k = labels[i];
    if (!k || whole[k] === -2) continue;
    if (whole[k] >= 0) masks[whole[k]][i] = 1;
    else { const s = slotOf(i % w); masks[s][i] = 1; cut[s] = true; }
  }
  masks.forEach((m, s) => {  // a digit left with no ink takes what lies between its partings
    if (m.some(v => v)) return;
    for (let y = 0; y < h; y++) for (let x = edges[s]; x < edges[s + 1]; x++) m[y * w + x] = mask[y * w + x];
    cut[s] = true;
  });
  const keep = masks.map((m, s) => s).filter(s => masks[s].some(v => v));
  return {masks: keep.map(s => masks[s]), note, rowProbs: keep.map(s => rowProbabilities(frames, t, found[s][1], found[s][2])), cut: keep.map(s => cut[s]),
          marked: keep.map(s => found[s][0] === S.MARK)};
}

function combined(probs, rowProbs, cut) {  // digit_image.combined
  return probs.map((p, k) => {
    if (!cut[k] && Math.max(...p) >= S.UNSURE) return p;
    const both = p.map((v, c) => v * rowProbs[k][c] ** S.ROW_WEIGHT), total = both.reduce((a, b) => a + b, 0);
    const digitMass = p.reduce((a, b) => a + b, 0);  // under 1 when the network gives some to "not a digit"
    return both.map(v => v / total * digitMass);
  });
}

ort.env.wasm.wasmPaths = "./";  // onnxruntime-web's .wasm beside the page: nothing is fetched from elsewhere
ort.env.wasm.numThreads = 1;  // threads would need a cross-origin-isolated host; a digit needs none
let rowSession = null;
async function rowFrames(row, width) {  // onnx_model.OnnxRows.row_frames: a row (ROW_HEIGHT x width) -> 11 or 12 x width / 2
  rowSession = rowSession || await ort.InferenceSession.create("rows.onnx", {executionProviders: ["wasm"]});
  const output = await rowSession.run({rows: new ort.Tensor("float32", row, [1, 1, S.ROW_HEIGHT, width])});
  return output.frames.data;
}

let session = null;
async function probabilities(digits) {
  // onnx_model.OnnxModel.probabilities: (N) x 784 normalised -> N x 10, TTA when the run used it
  session = session || await ort.InferenceSession.create("model.onnx", {executionProviders: ["wasm"]});
  const views = S.TTA ? S.TTA_SHIFTS : [[0, 0]], n = digits.length;
  const input = new Float32Array(views.length * n * 784);
  views.forEach(([dx, dy], v) => digits.forEach((d, k) => {
    for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
      const sy = Math.min(27, Math.max(0, y - dy)), sx = Math.min(27, Math.max(0, x - dx));  // edge pixels repeated
      input[(v * n + k) * 784 + y * 28 + x] = d[sy * 28 + sx];
    }
  }));
  const output = await session.run({digits: new ort.Tensor("float32", input, [views.length * n, 1, 28, 28])});
  const logs = output.log_probs.data;
  return digits.map((_, k) => Array.from({length: 10}, (_, c) =>
    views.reduce((s, _, v) => s + Math.exp(logs[(v * n + k) * 10 + c]), 0) / views.length));
}

function preview(digit) {
  const c = document.createElement("canvas");
  c.width = c.height = 28;
  const image = c.getContext("2d").createImageData(28, 28);
  digit.forEach((v, i) => {
    const p = Math.round(Math.min(1, Math.max(0, v * S.STD + S.MEAN)) * 255);
    image.data.set([p, p, p, 255], 4 * i);
  });
  c.getContext("2d").putImageData(image, 0, 0);
  return c.toDataURL("image/png");
}

window.readLocally = async canvas => {
  // digit_image.read_digits and .answer: what POST /predict answers, computed in the page
  const {gray, w, h, scale} = decode(canvas);
  const ink = inkOf(gray, w, h);
  let {masks, note, rowProbs, cut, marked} = await rowDigits(ink, w, h);
  const whole = new Uint8Array(ink.length).map((_, i) => ink[i] > S.INK ? 1 : 0);
  let x0 = w, x1 = 0, y0 = h, y1 = 0;
  whole.forEach((v, i) => { if (v) { x0 = Math.min(x0, i % w); x1 = Math.max(x1, i % w); y0 = Math.min(y0, Math.floor(i / w)); y1 = Math.max(y1, Math.floor(i / w)); } });
  if (masks.length > 1 && !note && x1 - x0 + 1 <= S.ONE_DIGIT_WIDTH * (y1 - y0 + 1)) {
    // no wider than one digit can be: one digit, unless the parts' answers are surer together, or one mark that
    // is not a digit when the network declines it whole (read_digits)
    const probs = await probabilities([centred(ink, w, h), ...masks.map(m => centred(ownInk(ink, m, w, h), w, h))]);
    const parts = combined(probs.slice(1), rowProbs, cut);
    if (Math.max(...probs[0]) >= parts.reduce((a, p) => a * Math.max(...p), 1) || Math.max(...probs[0]) < S.THRESHOLD) {
      masks = [whole]; rowProbs = [Array(10).fill(0.1)]; cut = [false]; marked = [marked.every(m => m)];
    }
  }
  if (masks.length > S.MAX_DIGITS) throw new Error(`the drawing: ${masks.length} digits found, more than the ${S.MAX_DIGITS} a number may have`);
  const digits = masks.length === 1 && masks[0].every((v, i) => v === whole[i]) ? [centred(ink, w, h)]
    : masks.map(m => centred(ownInk(ink, m, w, h), w, h));
  const probs = combined(await probabilities(digits), rowProbs, cut);
  const items = digits.map((d, k) => {
    let bx0 = w, bx1 = 0, by0 = h, by1 = 0;
    masks[k].forEach((v, i) => { if (v) { bx0 = Math.min(bx0, i % w); bx1 = Math.max(bx1, i % w + 1); by0 = Math.min(by0, Math.floor(i / w)); by1 = Math.max(by1, Math.floor(i / w) + 1); } });
    const p = probs[k], digit = p.indexOf(Math.max(...p));
    return {digit, probabilities: p, box: [bx0, by0, bx1, by1].map(v => roundHalfEven(v * scale)), preview: preview(d),
            // digit_image.declined: "not a digit"
            declined: (digits.length === 1 && Math.max(...p) < S.THRESHOLD) || (marked[k] && Math.max(...p) < S.MARK_SURE)};
  });
  window.lastInputs = digits.map(d => Array.from(d));  // for the browser test: the network's inputs
  const answer = {number: items.map(d => d.declined ? "?" : d.digit).join(""), digits: items,
                  not_a_digit: items.every(d => d.declined)};
  if (note) answer.note = note;
  if (items.length === 1) Object.assign(answer, {digit: items[0].digit, probabilities: items[0].probabilities, preview: items[0].preview});
  return answer;
};
})();
