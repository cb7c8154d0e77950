/* sinkscope view: plain JavaScript, no library, nothing fetched.
 * Reads the JSON in #sinkscope-data (written by circuits/view.py) and draws:
 * the tokens of one sequence coloured by sink score at one layer (a window of WINDOW tokens, so
 * an 8k-token sequence costs no more than a 1k one), the layer x position heat map (one canvas
 * column per pixel, the largest value of the positions it covers), and a token's detail.
 * window.sinkscope exposes the data, the state and render timings for the browser tests. */
(function () {
  "use strict";
  var T0 = performance.now();
  var D = JSON.parse(document.getElementById("sinkscope-data").textContent);
  var tParsed = performance.now();
  var L = D.n_layers, H = D.n_heads, EFFECT = D.kind === "effect";
  var VIEWS = EFFECT ? ["clean", "intervened", "delta"] : [D.runs[0]];
  var WINDOW = 1024;
  var S = { seq: 0, layer: D.default_layer || 0, view: VIEWS[0], scale: "sequence", start: 0, pinned: null, shown: null };
  var timings = { parse_ms: tParsed - T0, init_ms: 0, load_ms: 0, update_ms: [] };
  var spans = [], rowMax = {}, heatCache = null;
  var $ = function (id) { return document.getElementById(id); };

  // ---------------------------------------------------------------- values
  function seqData() { return D.sequences[S.seq]; }
  function value(seq, view, l, k) {
    if (view === "delta") {
      var c = seq.score.clean[l][k], v = seq.score.intervened[l][k];
      return c === null || v === null ? null : v - c;
    }
    return seq.score[view][l][k];
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (v === 0) return "0";
    return Number(v.toPrecision(4)).toString();
  }
  function fmtDelta(v) { return v === null ? "\u2013" : (v > 0 ? "+" : "") + fmt(v); }
  /* the colour scale's top: the largest |value| past the first token (the primary sink would
   * wash every other token out) in the sequence ("sequence") or in the layer ("layer"), or 1 */
  function rowTop(seq, view, l) {
    var key = S.seq + "|" + view + "|" + l;
    if (!(key in rowMax)) {
      var m = 0, n = seq.tokens.length;
      for (var k = 1; k < n; k++) { var v = value(seq, view, l, k); if (v !== null && Math.abs(v) > m) m = Math.abs(v); }
      rowMax[key] = m;
    }
    return rowMax[key];
  }
  function scaleMax(seq, view, l) {
    var m = 0;
    if (S.scale === "absolute") return 1;
    if (S.scale === "layer") m = rowTop(seq, view, l);
    else for (var i = 0; i < L; i++) m = Math.max(m, rowTop(seq, view, i));
    return m > 0 ? m : 1;
  }
  function ranges(xs) {  // [0,1,2,5] -> "0-2, 5"
    var out = [], i = 0;
    while (i < xs.length) { var j = i; while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++; out.push(j > i ? xs[i] + "-" + xs[j] : String(xs[i])); i = j + 1; }
    return out.join(", ");
  }
  // lightness-monotone ramps: white to dark red (magnitude), purple / white / orange (signed, as PuOr)
  var SEQ = [[255, 255, 255], [253, 212, 158], [252, 141, 89], [215, 48, 31], [127, 0, 0]];
  var NEG = [[255, 255, 255], [178, 171, 210], [94, 60, 153], [45, 0, 75]];
  var POS = [[255, 255, 255], [253, 184, 99], [230, 97, 1], [127, 59, 8]];
  function ramp(stops, t) {
    var x = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    var a = stops[i], b = stops[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }
  /* rgb of a value on the current scale; sqrt spreads the many small scores */
  function rgb(v, vmax, signed) {
    if (v === null) return [238, 238, 238];
    if (!signed) return ramp(SEQ, Math.sqrt(Math.max(0, v) / vmax));
    var t = Math.sqrt(Math.min(1, Math.abs(v) / vmax));
    return ramp(v < 0 ? NEG : POS, t);
  }
  function css(c) { return "rgb(" + Math.round(c[0]) + "," + Math.round(c[1]) + "," + Math.round(c[2]) + ")"; }
  function dark(c) { return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 120; }

  function secondaryOf(seq, k) {
    var out = {};
    D.runs.forEach(function (r) {
      (seq.secondary[r] || []).forEach(function (row) { if (row.position === k) out[r] = row; });
    });
    return out;
  }
  function isTarget(k) { return !!(D.target && D.target.positions.indexOf(k) >= 0); }
  function alphaRow(seq, run, k) {
    var pos = seq.alpha_positions, lo = 0, hi = pos.length - 1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1;
      if (pos[mid] === k) return seq.alpha[run][mid];
      if (pos[mid] < k) lo = mid + 1; else hi = mid - 1;
    }
    return null;
  }
  function alphaAt(seq, view, k, l) {
    var runs = view === "delta" ? ["clean", "intervened"] : [view], rows = runs.map(function (r) { return alphaRow(seq, r, k); });
    if (rows.some(function (r) { return r === null; })) return null;
    var out = [];
    for (var h = 0; h < H; h++) {
      var v = rows.map(function (r) { return r[l * H + h]; });
      out.push(view === "delta" ? (v[0] === null || v[1] === null ? null : v[1] - v[0]) : v[0]);
    }
    return out;
  }
  function shownToken(t) { return t.replace(/\n/g, "\u21B5\n").replace(/\t/g, "\u2192\t") || "\u2205"; }
  /* a token in quotes with its whitespace escaped; the \xHH bytes of a token that holds part of a
   * UTF-8 character (written so by circuits.probes) keep their one backslash */
  function quoted(t) { return JSON.stringify(t).replace(/\\\\x([89a-f][0-9a-f])/g, "\\x$1"); }
  /* the character(s) a token holds part of (null for a whole token) */
  function partOf(seq, k) { return (seq.chars && seq.chars[k]) || null; }
  /* the part of the input a token belongs to (template, problem or generated), from the runs
   * [start, stop, part] circuits.view stores; null when the input has no parts */
  var PART_NAMES = { template: "template: chat template, system prompt or a fixed lead-in", problem: "the problem text",
    generated: "generated: the model's own token" };
  function whereOf(seq, k) {
    var runs = seq.parts, lo = 0, hi = runs ? runs.length - 1 : -1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1, r = runs[mid];
      if (k < r[0]) hi = mid - 1; else if (k >= r[1]) lo = mid + 1; else return r[2];
    }
    return null;
  }

  // ---------------------------------------------------------------- text
  function renderText() {
    var seq = seqData(), n = seq.tokens.length, a = S.start, b = Math.min(n, a + WINDOW);
    var frag = document.createDocumentFragment(), sec = {};
    D.runs.forEach(function (r) { (seq.secondary[r] || []).forEach(function (row) { sec[row.position] = true; }); });
    spans = [];
    for (var k = a; k < b; k++) {
      var s = document.createElement("span");
      s.textContent = shownToken(seq.tokens[k]);
      s.dataset.k = k;
      var cls = [], part = partOf(seq, k), where = whereOf(seq, k);
      if (part) { cls.push("bytes"); s.title = "UTF-8 bytes of \u201C" + part + "\u201D"; }
      if (where) cls.push("part-" + where);
      if (k === 0) cls.push("primary");
      if (sec[k]) cls.push("secondary");
      if (isTarget(k)) cls.push("target");
      if (k === S.pinned) cls.push("sel");
      if (cls.length) s.className = cls.join(" ");
      frag.appendChild(s);
      spans.push(s);
    }
    $("text").replaceChildren(frag);
    $("window-label").textContent = n > WINDOW ? "tokens " + a + "\u2013" + (b - 1) + " of " + n + " (the window moves with a click on the heat map)" : n + " tokens";
    $("prev").disabled = a === 0;
    $("next").disabled = b >= n;
    $("window-nav").hidden = n <= WINDOW;
    recolour();
  }
  function recolour() {
    var seq = seqData(), vmax = scaleMax(seq, S.view, S.layer), signed = S.view === "delta";
    for (var i = 0; i < spans.length; i++) {
      var k = S.start + i, c = rgb(value(seq, S.view, S.layer, k), vmax, signed);
      spans[i].style.background = css(c);
      spans[i].style.color = dark(c) ? "#fff" : "";
    }
    legend(vmax, signed);
  }
  function legend(vmax, signed) {
    var stops = [];
    for (var i = 0; i <= 10; i++) { var t = i / 10; stops.push(css(rgb(signed ? vmax * (2 * t - 1) : vmax * t, vmax, signed))); }
    var what = S.view === "delta" ? "change of sink score (intervened \u2212 clean)" : "sink score";
    $("legend").innerHTML = "";
    var lab = function (txt) { var e = document.createElement("span"); e.textContent = txt; return e; };
    var bar = document.createElement("span");
    bar.className = "bar";
    bar.style.background = "linear-gradient(to right," + stops.join(",") + ")";
    $("legend").append(lab(what + " at layer " + S.layer + ": " + (signed ? fmt(-vmax) : "0")), bar,
      lab(fmt(vmax) + " (" + { sequence: "largest past the first token in this sequence", layer: "largest past the first token at this layer",
        absolute: "absolute" }[S.scale] + "; square-root scale)"));
    var keys = [["primary", "first token (primary sink)"], ["secondary", "secondary sink"]];
    if (D.target) keys.push(["target", "intervention target"]);
    if (seqData().parts) keys.push(["part-template", "template"], ["part-problem", "problem"], ["part-generated", "generated (no line)"]);
    keys.forEach(function (kv) {
      var e = document.createElement("span");
      e.className = "key";
      var sample = document.createElement("span");
      sample.className = kv[0];
      sample.style.cssText = kv[0] === "primary" ? "box-shadow: inset 0 0 0 2px #1b1b1b; padding: 0 3px" :
        kv[0] === "secondary" ? "border-bottom: 3px dashed #1f4fd1" : kv[0] === "target" ? "text-decoration: underline 3px solid #7b3294" :
        kv[0] === "part-template" ? "border-top: 2px dotted #8a8a8a" : kv[0] === "part-problem" ? "border-top: 2px solid #1b9e77" : "";
      sample.textContent = "abc";
      e.append(sample, " " + kv[1]);
      $("legend").append(e);
    });
  }

  // ---------------------------------------------------------------- status line
  function status() {
    var seq = seqData(), l = S.layer, eps = D.eps;
    var parts = [];
    var runs = S.view === "delta" ? ["clean", "intervened"] : [S.view];
    runs.forEach(function (r) {
      var a = alphaRow(seq, r, 0), heads = 0;
      for (var h = 0; h < H; h++) if (a[l * H + h] !== null && a[l * H + h] > eps) heads++;
      parts.push((EFFECT ? r + ": " : "") + "sink score " + fmt(seq.score[r][l][0]) + ", alpha_0 > " + eps + " in " + heads + " of " + H + " heads");
    });
    $("status").textContent = "Layer " + l + ", first token (primary sink): " + parts.join("; ") + ".";
  }

  // ---------------------------------------------------------------- heat map
  var heat = $("heat"), ROW = Math.max(3, Math.min(8, Math.floor(200 / L)));
  function heatBase() {
    var seq = seqData(), n = seq.tokens.length, key = S.seq + "|" + S.view + "|" + S.scale + "|" + heat.clientWidth;
    if (heatCache && heatCache.key === key) return heatCache;
    var cols = Math.max(1, Math.min(n, heat.clientWidth || 800)), signed = S.view === "delta";
    var img = document.createElement("canvas");
    img.width = cols; img.height = L;
    var ctx = img.getContext("2d"), data = ctx.createImageData(cols, L), arg = new Int32Array(cols * L);
    for (var l = 0; l < L; l++) {
      var vmax = scaleMax(seq, S.view, l);
      for (var c = 0; c < cols; c++) {
        var a = Math.floor(c * n / cols), b = Math.max(a + 1, Math.floor((c + 1) * n / cols)), best = null, bk = a;
        for (var k = a; k < b; k++) {
          var v = value(seq, S.view, l, k);
          if (v !== null && (best === null || Math.abs(v) > Math.abs(best))) { best = v; bk = k; }
        }
        arg[l * cols + c] = bk;
        var rgbv = rgb(best, vmax, signed), o = 4 * (l * cols + c);
        data.data[o] = rgbv[0]; data.data[o + 1] = rgbv[1]; data.data[o + 2] = rgbv[2]; data.data[o + 3] = 255;
      }
    }
    ctx.putImageData(data, 0, 0);
    heatCache = { key: key, img: img, cols: cols, arg: arg, n: n };
    return heatCache;
  }
  function drawHeat() {
    var base = heatBase(), w = heat.clientWidth || 800, h = L * ROW;
    if (heat.width !== w) heat.width = w;
    if (heat.height !== h) heat.height = h;
    var ctx = heat.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(base.img, 0, 0, w, h);
    var px = function (k) { return k / base.n * w; };
    if (base.n > WINDOW) {  // the text window
      ctx.strokeStyle = "rgba(31,79,209,0.9)"; ctx.lineWidth = 1;
      ctx.strokeRect(px(S.start) + 0.5, 0.5, Math.max(2, px(Math.min(base.n, S.start + WINDOW)) - px(S.start)) - 1, h - 1);
    }
    ctx.strokeStyle = "#1f4fd1"; ctx.lineWidth = 2;  // the layer
    ctx.strokeRect(1, S.layer * ROW, w - 2, ROW);
    var k = S.shown !== null ? S.shown : S.pinned;
    if (k !== null) {  // the token: a column outline
      var x0 = Math.min(w - 3, px(k)), cw = Math.max(3, w / base.n);
      ctx.strokeStyle = "#1f4fd1"; ctx.lineWidth = 2;
      ctx.strokeRect(x0, 1, cw, h - 2);
    }
  }
  function heatCell(ev) {
    var base = heatBase(), r = heat.getBoundingClientRect();
    var c = Math.min(base.cols - 1, Math.max(0, Math.floor((ev.clientX - r.left) / r.width * base.cols)));
    var l = Math.min(L - 1, Math.max(0, Math.floor((ev.clientY - r.top) / r.height * L)));
    return { layer: l, k: base.arg[l * base.cols + c] };
  }

  // ---------------------------------------------------------------- detail
  var SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var a in attrs) e.setAttribute(a, attrs[a]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  var RUN_COLOUR = { measurement: "#b30000", clean: "#5e5e5e", intervened: "#d95f0e" };
  function lineChart(seq, k) {
    var svg = $("d-line"), W = 320, Hh = 130, m = { l: 46, r: 8, t: 8, b: 22 }, top = 0;
    svg.replaceChildren();
    D.runs.forEach(function (r) { for (var l = 0; l < L; l++) { var v = seq.score[r][l][k]; if (v !== null && v > top) top = v; } });
    top = top > 0 ? top : 1;
    var x = function (l) { return m.l + (L > 1 ? l / (L - 1) : 0.5) * (W - m.l - m.r); };
    var y = function (v) { return Hh - m.b - v / top * (Hh - m.t - m.b); };
    svg.append(svgEl("line", { x1: m.l, x2: W - m.r, y1: y(0), y2: y(0), stroke: "#bbb" }),
      svgEl("line", { x1: m.l, x2: m.l, y1: y(0), y2: y(top), stroke: "#bbb" }),
      svgEl("text", { x: m.l - 4, y: y(top) + 4, "text-anchor": "end" }, fmt(top)),
      svgEl("text", { x: m.l - 4, y: y(0) + 3, "text-anchor": "end" }, "0"),
      svgEl("text", { x: x(0), y: Hh - 6, "text-anchor": "middle" }, "0"),
      svgEl("text", { x: x(L - 1), y: Hh - 6, "text-anchor": "middle" }, String(L - 1)),
      svgEl("text", { x: (m.l + W) / 2, y: Hh - 6, "text-anchor": "middle" }, "layer"),
      svgEl("line", { x1: x(S.layer), x2: x(S.layer), y1: y(0), y2: y(top), stroke: "#1f4fd1", "stroke-dasharray": "3 2" }));
    D.runs.forEach(function (r) {
      var pts = [];
      for (var l = 0; l < L; l++) { var v = seq.score[r][l][k]; if (v !== null) pts.push(x(l).toFixed(1) + "," + y(v).toFixed(1)); }
      svg.append(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: RUN_COLOUR[r], "stroke-width": 1.6, "data-run": r }));
      var cur = seq.score[r][S.layer][k];
      if (cur !== null) svg.append(svgEl("circle", { cx: x(S.layer), cy: y(cur), r: 3, fill: RUN_COLOUR[r] }));
    });
    var title = $("d-line-title");
    title.textContent = "sink score across layers";
    if (EFFECT) D.runs.forEach(function (r) {
      var e = document.createElement("span"); e.style.color = RUN_COLOUR[r]; e.textContent = " \u2014 " + r; title.append(e);
    });
  }
  function alphaBars(vals) {
    var svg = $("d-alpha-bars"), W = 320, Hh = 90, signed = S.view === "delta", top = 0;
    svg.replaceChildren();
    if (!vals) return;
    vals.forEach(function (v) { if (v !== null && Math.abs(v) > top) top = Math.abs(v); });
    top = (top || 1) * 1.12;
    var bw = (W - 20) / H, base = signed ? (Hh - 16) / 2 : Hh - 16, span = signed ? (Hh - 24) / 2 : Hh - 24;
    if (!signed && D.eps < top) svg.append(svgEl("line", { x1: 10, x2: W - 10, y1: base - D.eps / top * span, y2: base - D.eps / top * span, stroke: "#999", "stroke-dasharray": "2 2" }),
      svgEl("text", { x: W - 10, y: base - D.eps / top * span - 2, "text-anchor": "end" }, "eps " + D.eps));
    vals.forEach(function (v, h) {
      var hgt = v === null ? 0 : Math.abs(v) / top * span, up = v === null || v >= 0;
      svg.append(svgEl("rect", { x: 10 + h * bw + 1, y: up ? base - hgt : base, width: Math.max(1, bw - 2), height: hgt,
        fill: signed ? (up ? "#e66101" : "#5e3c99") : (v > D.eps ? "#b30000" : "#fc8d59") }),
        svgEl("text", { x: 10 + (h + 0.5) * bw, y: Hh - 3, "text-anchor": "middle" }, String(h)));
    });
  }
  function detail(k) {
    var seq = seqData();
    if (k === null || k === undefined) {
      $("detail-body").hidden = true; $("detail-empty").hidden = false; return;
    }
    $("detail-empty").hidden = true; $("detail-body").hidden = false;
    $("d-token").textContent = quoted(seq.tokens[k]);
    $("d-pos").textContent = k;
    var badges = $("d-badges"), sec = secondaryOf(seq, k);
    badges.replaceChildren();
    var badge = function (cls, txt) { var b = document.createElement("span"); b.className = "badge " + cls; b.textContent = txt; badges.append(b); };
    if (k === 0) badge("primary", "first token: the primary sink");
    if (partOf(seq, k)) badge("bytes", "UTF-8 bytes of \u201C" + partOf(seq, k) + "\u201D");
    var where = whereOf(seq, k);
    if (where) badge("part part-" + where, "part: " + PART_NAMES[where]);
    Object.keys(sec).forEach(function (r) { badge("secondary", (EFFECT ? r + ": " : "") + sec[r].kind); });
    if (isTarget(k)) badge("target", "intervention target");
    // sink score at the layer, per run
    var tbl = $("d-values"), l = S.layer;
    tbl.replaceChildren();
    var row = function (label, v, run, txt) {
      var tr = document.createElement("tr"), a = document.createElement("td"), b = document.createElement("td");
      a.textContent = label; b.textContent = txt; b.className = "num"; b.dataset.field = "score"; b.dataset.run = run;
      b.dataset.value = v === null ? "" : String(v);
      tr.append(a, b); tbl.append(tr);
    };
    D.runs.forEach(function (r) { var v = seq.score[r][l][k]; row("sink score at layer " + l + (EFFECT ? " (" + r + ")" : ""), v, r, fmt(v)); });
    if (EFFECT) { var dv = value(seq, "delta", l, k); row("change (intervened \u2212 clean)", dv, "delta", fmtDelta(dv)); }
    lineChart(seq, k);
    // alpha per head
    $("d-alpha-layer").textContent = l + (EFFECT ? " (" + S.view + ")" : "");
    var vals = alphaAt(seq, S.view, k, l), box = $("d-alpha");
    if (vals === null) {
      box.textContent = "not kept for this token: the page keeps alpha per head for " + D.alpha_tokens + " of " + D.n_tokens +
        " tokens (the first token, secondary sinks, targets, then the most attended), to stay small.";
      box.dataset.values = "";
    } else {
      box.replaceChildren.apply(box, vals.map(function (v, h) {
        var e = document.createElement("span"); e.textContent = "h" + h + " " + fmt(v); return e;
      }));
      box.dataset.values = JSON.stringify(vals);
    }
    alphaBars(vals);
    // secondary-sink anatomy
    var st = $("d-secondary"), runs = Object.keys(sec);
    st.replaceChildren();
    $("d-secondary-title").hidden = runs.length === 0;
    var fields = [["kind", "class"], ["start_layer", "creation layer"], ["lifetime", "lifetime (layers)"], ["peak_score", "peak sink score"],
      ["peak_layer", "at layer"], ["score_ratio", "\u00D7 median token"], ["max_abs_cos", "max |cos(h, h_0)|"]];
    if (runs.length) {
      if (EFFECT) {
        var hr = document.createElement("tr"); hr.append(document.createElement("td"));
        runs.forEach(function (r) { var td = document.createElement("td"); td.textContent = r; hr.append(td); });
        st.append(hr);
      }
      fields.forEach(function (f) {
        var tr = document.createElement("tr"), a = document.createElement("td");
        a.textContent = f[1]; tr.append(a);
        runs.forEach(function (r) {
          var td = document.createElement("td"), v = sec[r][f[0]];
          td.className = "num"; td.dataset.field = f[0]; td.dataset.run = r;
          td.textContent = typeof v === "number" && !Number.isInteger(v) ? fmt(v) : String(v);
          tr.append(td);
        });
        st.append(tr);
      });
    }
  }

  // ---------------------------------------------------------------- wiring
  function update() {
    var t = performance.now();
    recolour(); status(); drawHeat(); detail(S.shown !== null ? S.shown : S.pinned);
    $("layer-value").textContent = S.layer;
    timings.update_ms.push(performance.now() - t);
  }
  function setLayer(l) { S.layer = Math.max(0, Math.min(L - 1, l)); $("layer").value = S.layer; update(); }
  function moveWindowTo(k) {
    var n = seqData().tokens.length;
    if (k < S.start || k >= S.start + WINDOW) { S.start = Math.max(0, Math.min(k - (WINDOW >> 2), n - WINDOW)); S.start = Math.max(0, S.start); renderText(); }
  }
  function pin(k) {
    S.pinned = k; S.shown = null;
    spans.forEach(function (s) { s.classList.toggle("sel", +s.dataset.k === k); });
    detail(k); drawHeat();
  }
  function selectSequence(i) {
    S.seq = i; S.start = 0; S.pinned = null; S.shown = null;
    renderText(); status(); drawHeat(); detail(null);
  }

  function init() {
    $("title").textContent = D.title;
    var sub = [D.model, L + " layers \u00D7 " + H + " heads", "BOS prepended: " + D.prepend_bos, "positions 0-based"];
    if (EFFECT) {
      sub.push("intervention " + D.effect.spec);
      if (D.target) sub.push("target: layers " + ranges(D.target.layers) + ", positions " + ranges(D.target.positions));
      var ts = D.effect.target_sink_score;
      if (ts) sub.push("target sink score " + fmt(ts.clean) + " \u2192 " + fmt(ts.intervened) + " (" + fmtDelta(ts.delta) + ")");
    }
    $("subtitle").textContent = sub.join(" \u00B7 ");
    var sel = $("seq");
    D.sequences.forEach(function (s, i) {
      var o = document.createElement("option");
      o.value = i; o.textContent = s.index + ": " + s.label + " (" + s.tokens.length + " tokens)";
      sel.append(o);
    });
    sel.addEventListener("change", function () { selectSequence(+sel.value); });
    if (EFFECT) {
      VIEWS.forEach(function (v, i) {
        var lab = document.createElement("label"), r = document.createElement("input");
        r.type = "radio"; r.name = "run"; r.value = v; r.id = "run-" + v; r.checked = i === 0;
        r.addEventListener("change", function () { S.view = v; heatCache = null; update(); });
        lab.append(r, " " + v); $("run-switch").append(lab);
      });
    }
    var slider = $("layer");
    slider.max = L - 1; slider.value = S.layer;
    slider.addEventListener("input", function () { setLayer(+slider.value); });
    $("scale").addEventListener("change", function () { S.scale = $("scale").value; heatCache = null; update(); });
    $("prev").addEventListener("click", function () { S.start = Math.max(0, S.start - WINDOW); renderText(); drawHeat(); });
    $("next").addEventListener("click", function () { S.start = Math.min(seqData().tokens.length - 1, S.start + WINDOW); renderText(); drawHeat(); });
    var text = $("text");
    text.addEventListener("mouseover", function (ev) {
      var k = ev.target.dataset && ev.target.dataset.k;
      if (k === undefined) return;
      S.shown = +k; detail(S.shown); drawHeat();
    });
    text.addEventListener("mouseleave", function () { S.shown = null; detail(S.pinned); drawHeat(); });
    text.addEventListener("click", function (ev) { var k = ev.target.dataset && ev.target.dataset.k; if (k !== undefined) pin(+k); });
    heat.addEventListener("mousemove", function (ev) {
      var cell = heatCell(ev), seq = seqData(), v = value(seq, S.view, cell.layer, cell.k);
      $("heat-hover").textContent = "layer " + cell.layer + ", position " + cell.k + " " + quoted(seq.tokens[cell.k]) + ": " + fmt(v);
    });
    var heatHelp = "layer 0 at the top, position 0 at the left; hover for values, click to select";
    $("heat-hover").textContent = heatHelp;
    heat.addEventListener("mouseleave", function () { $("heat-hover").textContent = heatHelp; });
    heat.addEventListener("click", function (ev) {
      var cell = heatCell(ev);
      moveWindowTo(cell.k);
      S.layer = cell.layer; $("layer").value = S.layer;
      pin(cell.k); update();
      var s = spans[cell.k - S.start];
      if (s && s.scrollIntoView) s.scrollIntoView({ block: "nearest" });
    });
    window.addEventListener("resize", function () { heatCache = null; drawHeat(); });
    var notes = ["sinkscope view, self-contained: nothing is fetched.",
      "Sink score: the attention a token receives, averaged over heads and later queries (none for the last token).",
      "alpha: Gu et al.'s mean attention a key receives from the queries t \u2265 k, per head.",
      "Secondary sinks: |cos(h_t, h_0)| > " + D.thresholds.cos + "; secondary when " + D.thresholds.min_lifetime + " < lifetime < " +
        D.thresholds.primary_from + ", primary-like from " + D.thresholds.primary_from + " layers."];
    if (!D.alpha_complete) notes.push("Alpha per head is kept for " + D.alpha_tokens + " of " + D.n_tokens + " tokens.");
    if (D.sequences.length < D.n_sequences) notes.push("Showing " + D.sequences.length + " of " + D.n_sequences + " sequences (size budget; view(..., sequences=[...]) picks others).");
    $("notes").textContent = notes.join(" ");
    selectSequence(0);
    update();
    timings.init_ms = performance.now() - T0;
    timings.load_ms = performance.now();
  }

  window.sinkscope = { data: D, state: S, timings: timings, setLayer: setLayer, pin: pin, whereOf: whereOf };
  init();
})();
