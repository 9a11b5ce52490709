/* atpframework report: draws the page from the JSON document in #atpf-data (analysis/report.py builds it).
   Plain DOM and inline SVG: no libraries, no network. Numbers arrive as JSON numbers, NaN as null and
   infinities as "inf" / "-inf". */
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("atpf-data").textContent);
  const app = document.getElementById("app");
  const tip = document.getElementById("tip");
  const SVG_NS = (() => { const d = document.createElement("div"); d.innerHTML = "<svg></svg>"; return d.firstChild.namespaceURI; })();

  // ------------------------------------------------------------------ helpers
  function build(e, attrs, kids) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
    }
    return e;
  }
  const el = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
  const sv = (tag, attrs, ...kids) => build(document.createElementNS(SVG_NS, tag), attrs, kids);
  const num = (v) => (v === "inf" ? Infinity : v === "-inf" ? -Infinity : v === null || v === undefined ? NaN : v);
  function fmt(v) {
    v = num(v);
    if (Number.isNaN(v)) return "—";
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
    return String(+v.toPrecision(5));
  }
  const short = (text, n) => (text.length > n ? text.slice(0, n - 1) + "…" : text);
  const scoreName = () => (D.summary.graddrop ? "GradDrop score" : "mean |score|");
  function section(id, title, ...kids) {
    const s = el("section", { id }, el("h2", {}, title), kids);
    app.append(s);
    return s;
  }

  // tooltip: lines of [key, label, value, class]
  function showTip(ev, lines) {
    tip.replaceChildren(...lines.map(([key, label, value, cls]) =>
      el("div", { "data-key": key, class: cls }, label ? el("span", { class: "k" }, label + ": ") : null, el("span", { class: "v" }, value))));
    tip.hidden = false;
    const pad = 14, r = tip.getBoundingClientRect();
    let x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + r.width > window.innerWidth) x = Math.max(0, ev.clientX - r.width - pad);
    if (y + r.height > window.innerHeight) y = Math.max(0, ev.clientY - r.height - pad);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  const hideTip = () => { tip.hidden = true; };

  // colours: diverging blue - white - red for signed values, white - purple for scores; grey for missing
  const NEG = [33, 102, 172], MID = [247, 247, 247], POS = [178, 24, 43], SEQ = [84, 39, 143];
  const mix = (a, b, t) => "rgb(" + a.map((x, i) => Math.round(x + (b[i] - x) * t)).join(",") + ")";
  function colour(v, lim, signed) {
    v = num(v);
    if (!Number.isFinite(v)) return "#cfcfcf";
    const t = lim ? Math.max(-1, Math.min(1, v / lim)) : 0;
    if (!signed) return mix(MID, SEQ, Math.abs(t));
    return t < 0 ? mix(MID, NEG, -t) : mix(MID, POS, t);
  }

  // ------------------------------------------------------------------ the run
  function notes() {
    if (!D.notes.length) return;
    section("notes", "What this page leaves out", el("ul", {}, D.notes.map((n) => el("li", {}, n))));
  }

  function summary() {
    const S = D.summary, m = S.model || {};
    const model = m.architecture
      ? `${m.source} (${m.architecture}, ${m.n_layers} layers, ${m.n_heads} heads, d_model ${m.d_model}, ${m.dtype} on ${m.device})`
      : String(m.source ?? "?");
    const sels = Object.entries(S.selections).map(([n, s]) =>
      `${n}: ${s.kind} [${s.dims.slice(1).map((d, i) => d + " " + s.shape[i]).join(" × ")}]${s.sparse ? " (sparse)" : ""}`);
    const facts = [
      ["model", model],
      ["method", S.method],
      ["metric", `${S.metric}: clean ${fmt(S.mean_clean)}, noise ${fmt(S.mean_noise)} (mean over ${S.pairs} pair${S.pairs === 1 ? "" : "s"})`],
      ["scores", S.sign_convention],
      ["node selections", sels.join("; ")],
      ["created", S.created || "—"],
      ["versions", Object.entries(S.versions).map(([k, v]) => `${k} ${v}`).join(", ") || "—"],
    ];
    section("summary", "Run",
      el("table", { class: "facts" }, facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { "data-fact": k }, v)))),
      el("details", {}, el("summary", {}, "plan (JSON)"), el("pre", {}, JSON.stringify(S.plan, null, 2))),
      el("details", {}, el("summary", {}, "model (JSON)"), el("pre", {}, JSON.stringify(m, null, 2))));
  }

  function prompts() {
    const P = D.prompts;
    const line = (which, toks, differ) => el("div", { class: "tokens", "data-which": which }, el("span", { class: "which" }, which),
      toks.map((t, i) => el("span", { class: "tok" + (differ[i] ? " diff" : ""), title: `position ${i}` }, t.replace(/\n/g, "↵") || "∅")));
    const pairs = P.pairs.map((p, i) => el("div", { class: "pair" },
      el("div", { class: "pair-head" }, `pair ${i}`,
        p.answer !== null ? ` · answer ${JSON.stringify(p.answer)}` : "",
        p.wrong_answer !== null ? ` vs ${JSON.stringify(p.wrong_answer)}` : "",
        ` · metric clean ${fmt(p.metric_clean)}, noise ${fmt(p.metric_noise)} · ${p.length} tokens`),
      line("clean", p.clean, p.differ), line("noise", p.noise, p.differ)));
    const hint = P.decoded
      ? "One box per token (hover for its position); tokens that differ between clean and noise are highlighted."
      : "This result has no token strings, so tokens are shown by id (#id); AttributionResult.with_token_strings adds them.";
    section("prompts", "Prompts", el("p", { class: "hint" }, hint), pairs);
  }

  // ------------------------------------------------------------------ heatmaps
  function heatmaps() {
    const sels = D.selections.filter((s) => s.views.length);
    if (!sels.length) return;
    const sec = section("heatmaps", "Heatmaps", el("p", { class: "hint" },
      "Rows are layers. Colour: the signed estimate (red raises the metric when the node takes its noise-run value, " +
      "blue lowers it; limits symmetric) or the ranking score. Hover a cell for the node; grey: no value."));
    const row = el("div", { class: "heatmaps" });
    for (const sel of sels) sel.views.forEach((view, vi) => row.append(heatmap(sel, view, vi)));
    sec.append(row);
  }

  function heatmap(sel, view, vi) {
    const modes = [["signed", "signed estimate"], ["score", scoreName()]];
    if (view.has_verified) modes.push(["verified", "verified effect"]);
    let mode = view.limits.signed !== null ? "signed" : "score";
    let g = 0; // start on the grid holding the largest score
    view.grids.forEach((gr, i) => { if (gridMax(gr) > gridMax(view.grids[g])) g = i; });
    const what = view.cols.axis === "head" ? "layer × head" : view.cols.axis === "pos" ? "layer × position" : "per layer";
    const reduced = view.reduced
      ? `Each cell shows the highest-scoring of the ${view.reduced.size} nodes (${view.reduced.axes.join(" × ")}) at that layer` +
        (view.cols.axis === "pos" ? " and position." : ".")
      : "";
    const figure = el("div", { class: "figure" });
    const draw = () => figure.replaceChildren(grid(sel, view, view.grids[g], mode));
    const controls = el("div", { class: "controls" },
      el("label", {}, "colour by ", el("select", { class: "mode", onchange: (e) => { mode = e.target.value; draw(); } },
        modes.map(([k, t]) => el("option", { value: k, selected: k === mode }, t)))),
      view.grids.length > 1
        ? el("label", {}, ` ${view.sliced.join(" × ")} `, el("select", { class: "slice", onchange: (e) => { g = +e.target.value; draw(); } },
          view.grids.map((gr, i) => el("option", { value: i, selected: i === g }, gr.label))))
        : view.grids[0].label ? el("span", { class: "hint" }, " " + view.grids[0].label) : null);
    draw();
    return el("div", { class: "heatmap", "data-sel": sel.name, "data-view": vi },
      el("h3", {}, `${sel.name} (${sel.kind}): ${what}`), reduced ? el("p", { class: "hint" }, reduced) : null, controls, figure);
  }

  function gridMax(gr) {
    let best = -Infinity;
    for (const row of gr.score) for (const v of row) if (Number.isFinite(num(v)) && v > best) best = v;
    return best;
  }

  function grid(sel, view, gr, mode) {
    const rows = view.rows.labels, cols = view.cols.labels;
    const cw = Math.max(14, Math.min(44, Math.floor(760 / cols.length)));
    const ch = Math.max(10, Math.min(22, Math.floor(560 / rows.length)));
    const rotated = view.cols.axis === "pos";
    const left = 46, top = rotated ? 96 : 22;
    const W = left + cols.length * cw + 110, H = top + rows.length * ch + 14;
    const signed = mode !== "score";
    const lim = view.limits[mode];
    const values = gr[mode];
    const svg = sv("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "grid", role: "img",
      "aria-label": `${sel.name}: ${mode} by ${view.rows.axis} and ${view.cols.axis || "layer"}` });
    rows.forEach((r, i) => svg.append(sv("text", { x: left - 5, y: top + i * ch + ch / 2 + 4, "text-anchor": "end", class: "lab" }, r)));
    cols.forEach((c, j) => {
      const x = left + j * cw + cw / 2;
      svg.append(rotated
        ? sv("text", { transform: `translate(${x + 3},${top - 5}) rotate(-60)`, class: "lab" }, short(c, 16))
        : sv("text", { x, y: top - 6, "text-anchor": "middle", class: "lab" }, c));
    });
    const cells = sv("g", { class: "cells" });
    for (let i = 0; i < rows.length; i++) {
      for (let j = 0; j < cols.length; j++) {
        cells.append(sv("rect", { x: left + j * cw, y: top + i * ch, width: cw - 1, height: ch - 1, class: "cell",
          fill: colour(values[i][j], lim, signed), "data-sel": sel.name, "data-node": gr.node[i][j], "data-row": i, "data-col": j }));
      }
    }
    cells.addEventListener("mousemove", (ev) => {
      const c = ev.target.closest("rect.cell");
      if (c) showTip(ev, cellTip(view, gr, +c.dataset.row, +c.dataset.col));
    });
    cells.addEventListener("mouseleave", hideTip);
    svg.append(cells, legend(left + cols.length * cw + 18, top, Math.min(180, rows.length * ch), lim, signed));
    return svg;
  }

  function cellTip(view, gr, i, j) {
    const verified = gr.verified[i][j];
    const lines = [["node", null, gr.label_of[i][j], "title"]];
    const tokens = gr.tokens || view.cols.tokens[j] || "";
    if (tokens) lines.push(["tokens", "tokens", tokens]);
    lines.push(["signed", "signed estimate", fmt(gr.signed[i][j])], ["score", scoreName(), fmt(gr.score[i][j])],
      ["verified", "verified effect", Number.isFinite(num(verified)) ? fmt(verified) : "not verified"]);
    if (view.reduced) lines.push(["reduced", null, `highest-scoring of ${view.reduced.size} nodes here`, "hint"]);
    return lines;
  }

  function legend(x, y, h, lim, signed) {
    const g = sv("g", { class: "legend" }), steps = 24;
    for (let k = 0; k < steps; k++) {
      const t = 1 - (k + 0.5) / steps; // top: +lim
      const v = signed ? (2 * t - 1) * (lim || 0) : t * (lim || 0);
      g.append(sv("rect", { x, y: y + (k * h) / steps, width: 14, height: h / steps + 0.5, fill: colour(v, lim, signed) }));
    }
    const label = (v, yy) => g.append(sv("text", { x: x + 19, y: yy, class: "lab" }, lim === null ? "—" : fmt(v)));
    label(lim, y + 8);
    label(signed ? 0 : lim / 2, y + h / 2 + 4);
    label(signed ? -lim : 0, y + h);
    return g;
  }

  // ------------------------------------------------------------------ top nodes table
  function topTable() {
    const cols = [["rank", "rank", true], ["node", "node", false], ["kind", "kind", false], ["score", scoreName(), true],
      ["signed", "signed estimate", true], ["verified", "verified effect", true]];
    const rows = D.top.map((r) => el("tr", {}, cols.map(([k, , numeric]) => {
      const v = r[k];
      return el("td", { class: numeric ? "n" : null, "data-value": v === null ? "" : String(v) }, numeric && k !== "rank" ? (v === null ? "" : fmt(v)) : v);
    })));
    const tbody = el("tbody", {}, rows);
    let state = { col: -1, dir: 1 };
    const headers = cols.map(([k, title, numeric], ci) => el("th", { "data-col": k, "aria-sort": "none", class: numeric ? "n" : null },
      el("button", { type: "button", onclick: () => sortBy(ci) }, title)));
    function sortBy(ci) {
      state = { col: ci, dir: state.col === ci ? -state.dir : 1 };
      const key = (tr) => tr.children[ci].dataset.value;
      const sorted = Array.from(tbody.children).sort((a, b) => compare(key(a), key(b), cols[ci][2], state.dir));
      tbody.replaceChildren(...sorted);
      headers.forEach((h, i) => h.setAttribute("aria-sort", i !== ci ? "none" : state.dir > 0 ? "ascending" : "descending"));
    }
    section("top", `Top ${D.top.length} nodes`,
      el("p", { class: "hint" }, `By ${scoreName()} across all selections. Click a header to sort (again to reverse); empty cells sort last.`),
      el("table", { class: "top", id: "top-table" }, el("thead", {}, el("tr", {}, headers)), tbody));
  }

  // empty (or non-numeric, for numbers) values last in both directions; otherwise numeric or text order
  function compare(a, b, numeric, dir) {
    const x = numeric ? parseFloat(a) : a, y = numeric ? parseFloat(b) : b;
    const mx = numeric ? Number.isNaN(x) : a === "", my = numeric ? Number.isNaN(y) : b === "";
    if (mx || my) return mx - my;
    return dir * (numeric ? x - y : x.localeCompare(y));
  }

  // ------------------------------------------------------------------ charts
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((s) => s * mag).find((s) => s >= raw);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }

  // axes on [x0, x1] x [y0, y1]; returns the svg and the scales
  function axes({ x0, x1, y0, y1, xlabel, ylabel, logx = false, xticks = null, w = 460, h = 320 }) {
    const L = 62, R = 16, T = 14, B = 46;
    const fx = logx ? Math.log10 : (v) => v;
    const X = (v) => L + ((fx(v) - fx(x0)) / (fx(x1) - fx(x0) || 1)) * (w - L - R);
    const Y = (v) => h - B - ((v - y0) / (y1 - y0 || 1)) * (h - T - B);
    const svg = sv("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, class: "chart" });
    svg.append(sv("rect", { x: L, y: T, width: w - L - R, height: h - T - B, class: "frame" }));
    for (const t of xticks || niceTicks(x0, x1, 5)) {
      svg.append(sv("line", { x1: X(t), x2: X(t), y1: h - B, y2: h - B + 4, class: "tick" }),
        sv("text", { x: X(t), y: h - B + 16, "text-anchor": "middle", class: "lab" }, fmt(t)));
    }
    for (const t of niceTicks(y0, y1, 5)) {
      svg.append(sv("line", { x1: L - 4, x2: L, y1: Y(t), y2: Y(t), class: "tick" }),
        sv("text", { x: L - 7, y: Y(t) + 4, "text-anchor": "end", class: "lab" }, fmt(t)));
    }
    svg.append(sv("text", { x: (L + w - R) / 2, y: h - 8, "text-anchor": "middle", class: "axis" }, xlabel),
      sv("text", { transform: `translate(14,${(T + h - B) / 2}) rotate(-90)`, "text-anchor": "middle", class: "axis" }, ylabel));
    return { svg, X, Y };
  }

  const range = (vals, pad) => {
    const f = vals.map(num).filter(Number.isFinite);
    let lo = Math.min(...f), hi = Math.max(...f);
    if (!f.length) { lo = 0; hi = 1; }
    if (hi === lo) { lo -= 1; hi += 1; }
    const p = (hi - lo) * pad;
    return [lo - p, hi + p];
  };
  const path = (pts) => pts.map(([x, y], i) => (i ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1)).join(" ");

  function verification() {
    const V = D.verification;
    if (!V) return;
    const info = V.info || {};
    const confirmed = Object.entries(info.confirmed || {}).map(([k, v]) => `${k.replace("top_", "top ")}: ${v}`).join(", ");
    const facts = el("table", { class: "facts" },
      el("tr", {}, el("th", {}, "verified"), el("td", {}, `${V.count}` + (info.of_nodes ? ` of ${info.of_nodes} nodes` : " nodes") + (info.stopped ? ` (${info.stopped})` : ""))),
      el("tr", {}, el("th", {}, "confirmed"), el("td", {}, `mean |effect| ≥ ${fmt(V.threshold)}: ${V.confirmed[V.confirmed.length - 1]} of the ${V.points.length} drawn` + (confirmed ? `; among the top n estimated: ${confirmed}` : ""))));
    // scatter: the signed estimate (the score where a node has none) against the verified mean effect
    const pts = V.points.map((p) => ({ ...p, x: Number.isFinite(num(p.signed)) ? num(p.signed) : num(p.score) }));
    const [x0, x1] = range(pts.map((p) => p.x).concat([0]), 0.06), [y0, y1] = range(pts.map((p) => p.effect).concat([0]), 0.06);
    const lo = Math.max(x0, y0), hi = Math.min(x1, y1);
    const sc = axes({ x0, x1, y0, y1, xlabel: "estimate (signed)", ylabel: "verified effect (mean over pairs)" });
    if (hi > lo) sc.svg.append(sv("path", { d: path([[sc.X(lo), sc.Y(lo)], [sc.X(hi), sc.Y(hi)]]), class: "diag" }));
    const dots = sv("g", {}, pts.filter((p) => Number.isFinite(p.x) && Number.isFinite(num(p.effect))).map((p, i) =>
      sv("circle", { cx: sc.X(p.x), cy: sc.Y(p.effect), r: 3.5, class: num(p.strength) >= V.threshold ? "dot ok" : "dot", "data-i": i })));
    const shown = pts.filter((p) => Number.isFinite(p.x) && Number.isFinite(num(p.effect)));
    dots.addEventListener("mousemove", (ev) => {
      const c = ev.target.closest("circle");
      if (!c) return;
      const p = shown[+c.dataset.i];
      showTip(ev, [["node", null, p.node, "title"], ["signed", "signed estimate", fmt(p.signed)], ["score", scoreName(), fmt(p.score)],
        ["verified", "verified effect", fmt(p.effect)], ["strength", "mean |effect|", fmt(p.strength)], ["rank", "verified", `#${p.rank + 1}`]]);
    });
    dots.addEventListener("mouseleave", hideTip);
    sc.svg.append(dots);
    // confirmed nodes against nodes verified, in estimated order, with the best possible order for comparison
    const n = V.confirmed.length, total = V.confirmed[n - 1];
    const cu = axes({ x0: 0, x1: n, y0: 0, y1: Math.max(1, total) * 1.05, xlabel: "nodes verified (in estimated order)", ylabel: "confirmed nodes" });
    cu.svg.append(sv("path", { d: path([[cu.X(0), cu.Y(0)], [cu.X(total), cu.Y(total)], [cu.X(n), cu.Y(total)]]), class: "ideal" }),
      sv("path", { d: path([[cu.X(0), cu.Y(0)]].concat(V.confirmed.map((c, i) => [cu.X(i + 1), cu.Y(c)]))), class: "curve" }));
    section("verification", "Verification", facts,
      el("div", { class: "charts" },
        el("figure", {}, sc.svg, el("figcaption", {}, "Verified effect against the estimate; the dashed line is y = x. Filled: confirmed.")),
        el("figure", {}, cu.svg, el("figcaption", {}, "Confirmed nodes against nodes verified in estimated order; dashed: every confirmed node first."))));
  }

  function diagnosis() {
    const G = D.diagnosis;
    if (!G) return;
    const samples = G.bounds[0].samples;
    const all = G.bounds.flatMap((b) => b.bound.map(num)).concat(G.largest_verified === null ? [] : [G.largest_verified]);
    const [y0, y1] = range(all.concat([0]), 0.08);
    const logx = samples.length > 1 && samples[samples.length - 1] / samples[0] >= 4;
    const [xa, xb] = samples.length > 1 ? [samples[0], samples[samples.length - 1]] : [samples[0] / 2, samples[0] * 2];
    const ch = axes({ x0: xa, x1: xb, y0: Math.max(0, y0), y1, xlabel: "samples", ylabel: "bound on unverified |effect|", logx, xticks: samples });
    if (G.largest_verified !== null) {
      ch.svg.append(sv("path", { d: path([[ch.X(xa), ch.Y(G.largest_verified)], [ch.X(xb), ch.Y(G.largest_verified)]]), class: "ideal" }),
        sv("text", { x: ch.X(xb) - 4, y: ch.Y(G.largest_verified) - 5, "text-anchor": "end", class: "lab" }, "largest verified mean |effect|"));
    }
    G.bounds.forEach((b, k) => {
      const pts = b.samples.map((s, i) => [s, num(b.bound[i])]).filter(([, t]) => Number.isFinite(t));
      ch.svg.append(sv("path", { d: path(pts.map(([s, t]) => [ch.X(s), ch.Y(t)])), class: `curve c${k % 4}` }),
        sv("g", {}, pts.map(([s, t]) => sv("circle", { cx: ch.X(s), cy: ch.Y(t), r: 3, class: `dot c${k % 4}` }))));
    });
    const table = el("table", { class: "top small" },
      el("thead", {}, el("tr", {}, el("th", {}, "samples"), G.bounds.map((b, k) => el("th", { class: `c${k % 4}` }, `bound @ ${b.confidence}`)))),
      el("tbody", {}, samples.map((s, i) => el("tr", {}, el("td", { class: "n" }, s), G.bounds.map((b) => el("td", { class: "n" }, fmt(b.bound[i])))))));
    const worst = Object.entries(G.worst_node).map(([c, label]) => el("li", {}, `at ${c}: ${label}`));
    section("diagnosis", "Diagnostic bound",
      el("p", {}, `After verifying the top ${G.verified_top}: an upper bound, at each confidence, on the mean |effect| of any of the ` +
        `${G.remainder} unverified nodes (random subsets with p = ${G.p}; ${fmt(G.forward_equivalents_per_pair)} forward passes per pair).`),
      G.warnings.length
        ? el("ul", { class: "warnings" }, G.warnings.map((w) => el("li", {}, "warning: " + w)))
        : el("p", { class: "ok" }, "No warnings: the bound shrank with more samples and lies below the largest verified effect."),
      el("div", { class: "charts" }, el("figure", {}, ch.svg, el("figcaption", {}, "Bound against samples; dashed: the largest verified mean |effect|.")), table),
      el("p", {}, "Node attaining the final bound (a candidate to verify next):"), el("ul", {}, worst));
  }

  notes();
  summary();
  prompts();
  heatmaps();
  topTable();
  verification();
  diagnosis();
  const version = (D.summary.versions || {}).atpframework;
  app.append(el("footer", {}, `Written by atpframework${version ? " " + version : ""}. Self-contained: opens offline.`));
})();
