/* shipyard dashboard: the page scripts. Every page is a server-rendered shell; this fills it
 * from /ui/api with fetch (the API key, when the server has keys, comes from sessionStorage). */
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const KEY = "shipyard.apiKey";
  const fmt = (v) => window.ShipyardChart.fmt(v);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) { continue; }
      if (k === "class") { e.className = v; } else if (k === "text") { e.textContent = v; }
      else if (k.startsWith("on")) { e.addEventListener(k.slice(2), v); } else { e.setAttribute(k, v === true ? "" : v); }
    }
    for (const c of children) { if (c !== null && c !== undefined) { e.append(c instanceof Node ? c : String(c)); } }
    return e;
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY);
    if (key) { h.Authorization = "Bearer " + key; }
    return h;
  }

  async function api(path, opts) {
    opts = opts || {};
    const res = await fetch(path, { method: opts.method || "GET", headers: headers(opts.body ? { "Content-Type": "application/json" } : {}), body: opts.body ? JSON.stringify(opts.body) : undefined });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const msg = (data && (data.error && (data.error.message || data.error))) || res.statusText;
      if (res.status === 401) {  // the session cookie is gone (logged out, key revoked): log in again
        if (!sessionStorage.getItem(KEY)) { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search + location.hash); }
        else { askKey(); }
      }
      const err = new Error(String(msg)); err.status = res.status; throw err;
    }
    return data;
  }

  function toast(text, isError) {
    const t = el("div", { class: "t" + (isError ? " error" : ""), text });
    $("#toast").append(t);
    setTimeout(() => t.remove(), isError ? 8000 : 4000);
  }

  function askKey() {
    const d = $("#key-dialog");
    if (!d.open) { $("#key-input").value = ""; d.showModal(); }
  }

  function confirmDialog(title, text) {
    return new Promise((resolve) => {
      const d = $("#confirm-dialog");
      $("#confirm-title").textContent = title;
      $("#confirm-text").textContent = text;
      d.returnValue = "";
      d.addEventListener("close", () => resolve(d.returnValue === "yes"), { once: true });
      d.showModal();
    });
  }

  function when(ts) {
    if (!ts) { return "–"; }
    const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
    return d.toISOString().replace("T", " ").slice(0, 19);
  }

  function duration(s) {
    if (s === null || s === undefined) { return "–"; }
    if (s < 60) { return s.toFixed(1) + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " m " + Math.round(s % 60) + " s"; }
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " m";
  }

  function sparkline(ys) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 120 26"); svg.setAttribute("preserveAspectRatio", "none");
    if (ys && ys.length > 1) {
      const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
      const pts = ys.map((y, i) => (i / (ys.length - 1) * 118 + 1).toFixed(1) + "," + (24 - (y - lo) / span * 22).toFixed(1));
      const pl = document.createElementNS(ns, "polyline");
      pl.setAttribute("points", pts.join(" "));
      svg.append(pl);
    }
    return svg;
  }

  function badge(text, cls) { return el("span", { class: "badge " + (cls || text), text }); }

  // ---------------------------------------------------------------------------- runs page

  // cross-validation folds and tuning trials come grouped (GET /ui/api/runs "groups"): a group
  // row (cv: mean ± std of the folds' best value; study: the best trial) that expands to its runs
  function groupValue(g) {
    if (g.value === null || g.value === undefined) { return "–"; }
    if (g.kind === "cv") { return g.metric + " " + fmt(g.mean) + " ± " + fmt(g.std); }
    return g.metric + " " + fmt(g.value) + " ★ trial " + g.best_trial;
  }
  function groupBadge(g) {
    return g.kind === "cv" ? "cv · " + g.n + " of " + g.k + " folds" : "study " + g.study + " · " + g.trials + " trials";
  }

  async function runsPage() {
    const data = await api("/ui/api/runs");
    const rows = data.runs;
    const groups = data.groups || [];
    const runById = new Map(rows.map((r) => [r.id, r]));
    const groupById = new Map(groups.map((g) => [g.id, g]));
    $("#runs-root").textContent = "Folder: " + data.root;
    const tbody = $("#runs-table tbody");
    const selected = new Set(), selectedGroups = new Set(), open = new Set();
    let sortKey = "started", sortDir = -1, shown = 200, filtered = [];
    // the top level: runs outside any group, and groups that are not inside another group
    const items = rows.filter((r) => !r.group).map((r) => ({ run: r }))
      .concat(groups.filter((g) => !g.parent).map((g) => ({ group: g })));
    const itemValue = (it, k) => {
      if (it.run) { return k === "best" ? (it.run.best ? it.run.best.value : null) : it.run[k]; }
      const g = it.group;
      return { name: g.name, id: g.id, status: g.status, started: g.started, best: g.value }[k];
    };
    const runText = (r) => [r.name, r.id, r.status, r.model, r.task].join(" ").toLowerCase();
    function groupMatches(g, q) {
      if ((g.name + " " + g.id + " " + g.kind + " " + g.status).toLowerCase().includes(q)) { return true; }
      return g.members.some((m) => (m.run && runById.has(m.run) && runText(runById.get(m.run)).includes(q)) || (m.group && groupById.has(m.group) && groupMatches(groupById.get(m.group), q)));
    }
    function updateButton() {
      const n = selected.size + [...selectedGroups].reduce((a, id) => a + groupById.get(id).members.length, 0);
      $("#compare-button").disabled = n < 2;
    }
    function checkbox(set, id) {
      const cb = el("input", { type: "checkbox", "aria-label": "select " + id });
      cb.checked = set.has(id);
      cb.addEventListener("change", () => { if (cb.checked) { set.add(id); } else { set.delete(id); } updateButton(); });
      return cb;
    }
    function runRow(r, member, depth, star) {
      const best = r.best ? r.metric + " " + fmt(r.best.value) : "–";
      const name = el("td", { class: depth ? "indent-" + Math.min(depth, 2) : null });
      if (member) { name.append(el("span", { class: "member", text: member + (star ? " ★" : "") }), " "); }
      name.append(el("a", { href: "/ui/runs/" + encodeURI(r.id), text: r.name }));
      return el("tr", { "data-id": r.id, class: depth ? "member-row" : null, "data-best": star ? "1" : null },
        el("td", { class: "check" }, checkbox(selected, r.id)),
        name,
        el("td", { class: "hide-sm muted mono", text: r.id }),
        el("td", {}, badge(r.status)),
        el("td", { class: "hide-sm", text: when(r.started) }),
        el("td", { class: "hide-sm num", text: duration(r.duration_s) }),
        el("td", { class: "num", text: best }),
        el("td", { class: "num", text: fmt(r.final_loss) }),
        el("td", {}, sparkline(r.spark)));
    }
    function groupRows(g, frag, depth, member, star) {
      const isOpen = open.has(g.id);
      const toggle = el("button", { type: "button", class: "ghost small toggle", "aria-expanded": isOpen ? "true" : "false", "data-toggle": g.id, text: isOpen ? "▾" : "▸" });
      toggle.addEventListener("click", () => { if (open.has(g.id)) { open.delete(g.id); } else { open.add(g.id); } render(); });
      const name = el("td", { class: depth ? "indent-" + Math.min(depth, 2) : null }, toggle, " ");
      if (member) { name.append(el("span", { class: "member", text: member + (star ? " ★" : "") }), " "); }
      name.append(el("b", { text: g.name }), " ", badge(groupBadge(g), "group-kind"));
      frag.append(el("tr", { class: "group-row", "data-group": g.id, "data-kind": g.kind },
        el("td", { class: "check" }, depth ? null : checkbox(selectedGroups, g.id)),
        name,
        el("td", { class: "hide-sm muted gid", text: g.id }),
        el("td", {}, badge(g.status)),
        el("td", { class: "hide-sm", text: when(g.started) }),
        el("td", { class: "hide-sm num", text: "–" }),
        el("td", { class: "num group-value", text: groupValue(g) }),
        el("td", { class: "num", text: "–" }),
        el("td", {})));
      if (!isOpen) { return; }
      for (const m of g.members) {
        const star = g.kind === "tune" && m.best;
        const label = m.label + (g.kind === "tune" && m.state !== "COMPLETE" ? " (" + m.state.toLowerCase() + ")" : "");
        if (m.run && runById.has(m.run)) { frag.append(runRow(runById.get(m.run), label, depth + 1, star)); }
        else if (m.group && groupById.has(m.group)) { groupRows(groupById.get(m.group), frag, depth + 1, label, star); }
        else { frag.append(el("tr", { class: "member-row", "data-trial": String(m.number) }, el("td", {}), el("td", { class: "indent-" + Math.min(depth + 1, 2), colspan: "8" }, el("span", { class: "member", text: label }), " ", el("span", { class: "muted", text: m.error || "no run directory" })))); }
      }
      if (g.final && runById.has(g.final)) { frag.append(runRow(runById.get(g.final), "final (every fold)", depth + 1, false)); }
    }

    function render() {
      const q = $("#filter").value.trim().toLowerCase();
      filtered = items.filter((it) => !q || (it.run ? runText(it.run).includes(q) : groupMatches(it.group, q)));
      filtered.sort((a, b) => {
        const x = itemValue(a, sortKey), y = itemValue(b, sortKey);
        if (x === y) { return 0; } if (x === null || x === undefined) { return 1; } if (y === null || y === undefined) { return -1; }
        return (x < y ? -1 : 1) * sortDir;
      });
      tbody.textContent = "";
      const frag = document.createDocumentFragment();
      for (const it of filtered.slice(0, shown)) {
        if (it.run) { frag.append(runRow(it.run, null, 0, false)); } else { groupRows(it.group, frag, 0, null, false); }
      }
      tbody.append(frag);
      $("#run-count").textContent = rows.length + " runs" + (groups.length ? " · " + groups.length + " groups" : "") + (filtered.length === items.length ? "" : " · " + filtered.length + " shown");
      $("#more").hidden = filtered.length <= shown;
      $("#empty").hidden = rows.length > 0;
      for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
        th.classList.toggle("sorted-asc", th.dataset.sort === sortKey && sortDir === 1);
        th.classList.toggle("sorted-desc", th.dataset.sort === sortKey && sortDir === -1);
      }
    }
    let timer = null;
    $("#filter").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { shown = 200; render(); }, 120); });
    $("#more").addEventListener("click", () => { shown += 500; render(); });
    for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
      th.addEventListener("click", () => { if (sortKey === th.dataset.sort) { sortDir = -sortDir; } else { sortKey = th.dataset.sort; sortDir = 1; } render(); });
    }
    $("#compare-button").addEventListener("click", () => {
      const q = [...selected].map((id) => "run=" + encodeURIComponent(id)).concat([...selectedGroups].map((id) => "group=" + encodeURIComponent(id)));
      location.href = "/ui/compare?" + q.join("&");
    });
    render();
    document.body.dataset.ready = "1";
  }

  // ----------------------------------------------------------------------------- run page

  async function runPage() {
    const id = document.body.dataset.run;
    const base = "/ui/api/runs/" + encodeURI(id);
    const detail = await api(base);
    const s = detail.summary;
    $("#run-name").textContent = s.name;
    const status = $("#run-status");
    status.textContent = s.status; status.className = "badge " + s.status;
    $("#run-meta").textContent = id + " · " + (s.model || "?") + " · " + (s.task || "") + " · started " + when(s.started) + " · " + s.steps + " steps";
    $("#config").textContent = toYaml(detail.config, 0);
    renderReport(detail);
    renderArtifacts(detail);
    const palette = window.ShipyardChart.palette();
    const chart = new window.ShipyardChart.LineChart($("#chart"), { xLabel: "step" });
    let keys = null, all = [], x = "step", offset = 0, series = {};

    async function load() {
      const q = new URLSearchParams({ x, max_points: "2000" });
      if (keys) { q.set("keys", keys.join(",")); }
      const data = await api(base + "/series?" + q);
      series = data.series; offset = data.offset;
      if (!keys) { keys = Object.keys(series); }
      draw();
      picker(data.columns);
    }
    function draw() {
      chart.opts.xLabel = x === "time" ? "seconds" : x;
      chart.setData(keys.filter((k) => series[k]).map((k, i) => ({ name: k, color: palette[i % palette.length], x: series[k].x, y: series[k].y, best: series[k].best })));
      const watched = series["val_" + s.metric];
      $("#best-note").textContent = watched && watched.best ? "Best val " + s.metric + " " + fmt(watched.best.y) + " at " + x + " " + fmt(watched.best.x) + " (◆ marks each curve's best)." : "◆ marks each curve's best.";
    }
    function picker(columns) {
      if (all.length) { return; }
      all = columns;
      const box = $("#series-picker");
      box.textContent = "";
      for (const k of all) {
        const cb = el("input", { type: "checkbox", "data-key": k });
        cb.checked = keys.includes(k);
        cb.addEventListener("change", () => { keys = all.filter((c) => (c === k ? cb.checked : keys.includes(c))); load(); });
        box.append(el("label", {}, cb, " " + k));
      }
    }
    $("#x-axis").addEventListener("change", (e) => { x = e.target.value; chart.resetZoom(); load(); });
    $("#smoothing").addEventListener("input", (e) => { $("#smoothing-value").textContent = e.target.value; chart.setSmoothing(+e.target.value); });
    $("#log-scale").addEventListener("change", (e) => chart.setLog(e.target.checked));
    await load();
    document.body.dataset.ready = "1";

    // live: poll the tail; new records are appended in place (the zoom is kept)
    let t0 = null;
    async function poll() {
      if (!$("#live").checked) { return; }
      try {
        const data = await api(base + "/tail?offset=" + offset);
        if (data.reload) { await load(); return; }
        offset = data.offset; t0 = data.t0;
        let changed = false;
        const fresh = data.records.some((r) => (r.kind === "train" || r.kind === "val") && Object.entries(r).some(([f, v]) => typeof v === "number" && !["step", "epoch", "time"].includes(f) && !all.includes(r.kind === "val" ? "val_" + f : f)));
        if (fresh) {  // a new kind of curve (the first validation): fetch again, zoom kept
          keys = null; all = [];
          await load();
          document.body.dataset.updates = String(+(document.body.dataset.updates || 0) + 1);
          return;
        }
        for (const r of data.records) {
          const kind = r.kind;
          if (kind !== "train" && kind !== "val") { continue; }
          for (const [f, v] of Object.entries(r)) {
            if (typeof v !== "number" || ["step", "epoch", "time"].includes(f)) { continue; }
            const key = kind === "val" ? "val_" + f : f;
            if (!series[key]) { continue; }
            const xv = x === "time" ? (r.time !== undefined && t0 !== null ? r.time - t0 : null) : r[x];
            if (xv === null || xv === undefined) { continue; }
            series[key].x.push(xv); series[key].y.push(v); series[key].points += 1;
            const b = series[key].best;
            if (!b || (b.mode === "min" ? v < b.y : v > b.y)) { series[key].best = { x: xv, y: v, mode: b ? b.mode : "min" }; }
            changed = true;
          }
        }
        if (changed) { draw(); document.body.dataset.updates = String(+(document.body.dataset.updates || 0) + 1); }
        if (data.finished) {
          status.textContent = "finished"; status.className = "badge finished";
          const d = await api(base); renderReport(d); renderArtifacts(d);
        }
      } catch (e) { /* keep polling; a toast per poll would be noise */ }
    }
    setInterval(poll, 1000);

    $("#register-button").addEventListener("click", async () => {
      if (!detail.package) { return; }
      const ok = await confirmDialog("Register package", "Register " + detail.package.path + " in the registry as the next version of " + (detail.package.name || s.name) + "?");
      if (!ok) { return; }
      try {
        const r = await api(base + "/register", { method: "POST", body: {} });
        toast("registered " + r.registered.name + ":" + r.registered.version);
      } catch (e) { toast(e.message, true); }
    });
  }

  function renderReport(detail) {
    const box = $("#report");
    if (!detail.report) { return; }
    box.textContent = "";
    for (const [section, values] of Object.entries(detail.report)) {
      box.append(el("h3", { text: section }));
      const dl = el("dl", { class: "kv" });
      for (const [k, v] of Object.entries(values)) { dl.append(el("dt", { text: k }), el("dd", { text: typeof v === "number" ? fmt(v) : String(v) })); }
      box.append(dl);
    }
    const plots = $("#plots");
    plots.textContent = "";
    for (const p of detail.plots) {  // fetched with the key (an <img src> cannot send one)
      const img = el("img", { alt: p });
      plots.append(img);
      fetch("/ui/api/runs/" + encodeURI(document.body.dataset.run) + "/files/" + p, { headers: headers() })
        .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
        .then((b) => { img.src = URL.createObjectURL(b); img.dataset.loaded = "1"; })
        .catch(() => { img.alt = p + " (could not load)"; });
    }
    if (!detail.plots.length) { plots.append(el("p", { class: "muted", text: "No plots yet." })); }
  }

  function renderArtifacts(detail) {
    const box = $("#artifacts");
    box.textContent = "";
    const dl = el("dl", { class: "kv" });
    dl.append(el("dt", { text: "directory" }), el("dd", { class: "mono", text: detail.path }));
    dl.append(el("dt", { text: "checkpoints" }), el("dd", { text: detail.checkpoints.length ? detail.checkpoints.join(", ") : "none" }));
    dl.append(el("dt", { text: "package" }), el("dd", { class: "mono", text: detail.package ? detail.package.path : "not yet (written when the run ends)" }));
    box.append(dl);
    $("#register-button").hidden = !detail.package;
  }

  function toYaml(v, depth) {
    const pad = "  ".repeat(depth);
    if (v === null || typeof v !== "object") { return JSON.stringify(v); }
    if (Array.isArray(v)) { return v.length && v.every((x) => x === null || typeof x !== "object") ? "[" + v.map((x) => JSON.stringify(x)).join(", ") + "]" : "\n" + v.map((x) => pad + "- " + toYaml(x, depth + 1)).join("\n"); }
    const keys = Object.keys(v);
    if (!keys.length) { return "{}"; }
    return (depth ? "\n" : "") + keys.map((k) => { const val = toYaml(v[k], depth + 1); return pad + k + ":" + (val.startsWith("\n") ? val : " " + val); }).join("\n");
  }

  // ------------------------------------------------------------------------- compare page

  async function comparePage() {
    const params = new URLSearchParams(location.search);
    const ids = params.getAll("run"), gids = params.getAll("group");
    if (ids.length < 2 && !gids.length) { document.body.dataset.ready = "1"; return; }
    $("#compare-hint").textContent = [ids.length ? ids.length + " runs: " + ids.join(", ") : "", gids.length ? "groups: " + gids.join(", ") : ""].filter(Boolean).join(" · ");
    const palette = window.ShipyardChart.palette();
    const chart = new window.ShipyardChart.LineChart($("#compare-chart"), { xLabel: "step" });
    let data = null;
    async function load(full) {
      const q = new URLSearchParams(ids.map((id) => ["run", id]).concat(gids.map((id) => ["group", id])));
      if (full) { q.set("full", "1"); }
      data = await api("/ui/api/compare?" + q);
      diff(); best(); curves(); grouped();
    }
    // the runs' cv and tune groups: mean ± std over every fold, the study's ranking
    const label = (r) => r.name + " · " + r.id + (r.member ? " · " + r.member : "");
    function starred() {
      const out = new Set();
      for (const g of data.groups) { for (const m of g.members) { if (m.best && m.run) { out.add(m.run); } } }
      return out;
    }
    function grouped() {
      const t = $("#compare-groups"); t.textContent = "";
      $("#compare-groups-card").hidden = !data.groups.length;
      if (!data.groups.length) { return; }
      t.append(el("thead", {}, el("tr", {}, ...["group", "kind", "value", "members (best first for a study)", "on this page"].map((h) => el("th", { text: h })))));
      const body = el("tbody");
      for (const g of data.groups) {
        const members = g.members.map((m) => m.label + (m.value === null || m.value === undefined ? "" : " " + fmt(m.value)) + (m.best ? " ★" : "")).join(" · ");
        body.append(el("tr", { "data-group": g.id, "data-kind": g.kind },
          el("td", { class: "mono", text: g.id }),
          el("td", {}, badge(groupBadge(g), "group-kind")),
          el("td", { class: "num group-value", text: groupValue(g) }),
          el("td", { class: "wrap small", text: members }),
          el("td", { class: "num", text: String(g.compared.length) })));
      }
      t.append(body);
    }
    function diff() {
      const t = $("#compare-diff"); t.textContent = "";
      const head = el("tr", {}, el("th", { text: "setting" }), ...data.runs.map((r) => el("th", { text: label(r) })));
      t.append(el("thead", {}, head));
      const body = el("tbody");
      const entries = Object.entries(data.differences);
      for (const [k, vals] of entries) {
        const differs = vals.some((v) => JSON.stringify(v) !== JSON.stringify(vals[0]));
        body.append(el("tr", { "data-key": k }, el("td", { class: "mono", text: k }), ...vals.map((v) => el("td", { class: "mono wrap" + (differs ? " diff-cell" : ""), text: v === null ? "–" : JSON.stringify(v) }))));
      }
      if (!entries.length) { body.append(el("tr", {}, el("td", { colspan: String(data.runs.length + 1), class: "muted", text: "The runs have identical settings." }))); }
      t.append(body);
      $("#compare-diff-card").hidden = false;
    }
    function best() {
      const t = $("#compare-best"); t.textContent = "";
      const metrics = [...new Set(data.at_best.flatMap((m) => Object.keys(m)))];
      t.append(el("thead", {}, el("tr", {}, el("th", { text: "run" }), el("th", { text: "best step" }), ...metrics.map((m) => el("th", { text: "val " + m })), el("th", { text: "final loss" }), el("th", { text: "status" }))));
      const body = el("tbody");
      const stars = starred();
      data.runs.forEach((r, i) => {
        const sw = el("i", { class: "swatch" });
        sw.style.display = "inline-block"; sw.style.width = "10px"; sw.style.height = "10px"; sw.style.marginRight = "6px"; sw.style.background = palette[i % palette.length];
        const cells = metrics.map((m) => {
          const v = data.at_best[i][m];
          const vals = data.at_best.map((x) => x[m]).filter((x) => typeof x === "number");
          const lower = /loss|error/.test(m);
          const top = vals.length > 1 && v === (lower ? Math.min(...vals) : Math.max(...vals));
          return el("td", { class: "num" + (top ? " top" : ""), text: fmt(v) });
        });
        const star = stars.has(r.id);
        body.append(el("tr", { "data-run": r.id, "data-best": star ? "1" : null }, el("td", {}, sw, el("a", { href: "/ui/runs/" + encodeURI(r.id), text: label(r) + (star ? " ★" : "") })), el("td", { class: "num", text: r.best ? r.best.step : "–" }), ...cells, el("td", { class: "num", text: fmt(r.final_loss) }), el("td", {}, badge(r.status))));
      });
      t.append(body);
      $("#compare-best-card").hidden = false;
    }
    function curves() {
      const which = $("#compare-key").value;
      const series = [];
      data.curves.forEach((c, i) => {
        const key = which === "loss" ? "loss" : Object.keys(c).find((k) => k.startsWith("val_"));
        if (key && c[key]) { series.push({ name: label(data.runs[i]) + " · " + key, color: palette[i % palette.length], x: c[key].x, y: c[key].y, best: c[key].best }); }
      });
      chart.setData(series);
      $("#compare-curves-card").hidden = false;
    }
    $("#compare-full").addEventListener("change", (e) => load(e.target.checked));
    $("#compare-key").addEventListener("change", curves);
    $("#compare-log").addEventListener("change", (e) => chart.setLog(e.target.checked));
    await load(false);
    document.body.dataset.ready = "1";
  }

  // ------------------------------------------------------------------------ registry page

  async function registryPage() {
    const list = $("#models");
    async function loadModels() {
      const data = await api("/ui/api/registry/models");
      list.textContent = "";
      for (const m of data.models) {
        const a = el("a", { href: "#" + encodeURIComponent(m.name), "data-name": m.name }, el("span", { text: m.name }), el("span", { class: "muted small", text: m.versions + " version" + (m.versions === 1 ? "" : "s") }));
        a.addEventListener("click", (e) => { e.preventDefault(); history.replaceState(null, "", "#" + encodeURIComponent(m.name)); showModel(m.name); });
        list.append(el("li", {}, a));
      }
      $("#models-empty").hidden = data.models.length > 0;
      return data.models;
    }
    async function showModel(name) {
      for (const a of list.querySelectorAll("a")) { a.classList.toggle("active", a.dataset.name === name); }
      const m = await api("/ui/api/registry/models/" + encodeURIComponent(name));
      $("#model-card").hidden = false;
      $("#model-title").textContent = name + (m.versions.length && m.versions[0].task ? " · " + m.versions[0].task : "");
      const al = $("#aliases"); al.textContent = "";
      for (const [alias, v] of Object.entries(m.aliases)) {
        const rb = el("button", { type: "button", class: "ghost small", "data-rollback": alias, text: "roll back" });
        rb.addEventListener("click", async () => {
          if (!(await confirmDialog("Roll back " + name + "@" + alias, "Point " + alias + " back to the version it had before version " + v + "?"))) { return; }
          try { const r = await api("/ui/api/registry/models/" + encodeURIComponent(name) + "/rollback", { method: "POST", body: { alias } }); toast(name + "@" + alias + " → version " + r.current.version + " (by " + r.actor + ")"); showModel(name); }
          catch (e) { toast(e.message, true); }
        });
        al.append(el("span", { class: "alias", "data-alias": alias }, badge(alias, alias), el("b", { text: "v" + v }), rb));
      }
      if (!Object.keys(m.aliases).length) { al.append(el("span", { class: "muted", text: "No aliases yet." })); }
      const vt = $("#versions"); vt.textContent = "";
      vt.append(el("thead", {}, el("tr", {}, ...["version", "aliases", "created", "metrics", "lineage", ""].map((h) => el("th", { text: h })))));
      const body = el("tbody");
      for (const v of m.versions) {
        const sel = el("select", { "aria-label": "alias" }, ...["production", "staging", "archived"].map((a) => el("option", { value: a, text: a })));
        const btn = el("button", { type: "button", class: "small", "data-promote": String(v.version), text: "promote" });
        btn.addEventListener("click", async () => {
          const alias = sel.value;
          if (!(await confirmDialog("Promote " + name + ":" + v.version, "Point " + alias + " at version " + v.version + "? Servers that follow " + name + "@" + alias + " will use it on their next load."))) { return; }
          try { const r = await api("/ui/api/registry/models/" + encodeURIComponent(name) + "/promote", { method: "POST", body: { version: v.version, alias } }); toast(name + "@" + alias + " → version " + v.version + " (by " + r.actor + ")"); showModel(name); }
          catch (e) { toast(e.message, true); }
        });
        body.append(el("tr", { "data-version": String(v.version) },
          el("td", { class: "num", text: v.version }),
          el("td", {}, ...v.aliases.map((a) => badge(a, a))),
          el("td", { text: when(v.created).slice(0, 16) }),
          el("td", { class: "wrap small", text: metricsText(v.metrics) }),
          lineageCell(v),
          el("td", {}, el("span", { class: "row" }, sel, btn))));
      }
      vt.append(body);
      reports(m.versions);
      const ht = $("#history"); ht.textContent = "";
      ht.append(el("thead", {}, el("tr", {}, ...["when", "alias", "action", "version", "who"].map((h) => el("th", { text: h })))));
      const hb = el("tbody");
      for (const e of m.history) {
        hb.append(el("tr", {}, el("td", { text: when(e.created) }), el("td", {}, badge(e.alias, e.alias)), el("td", {}, badge(e.action + (e.undone ? " (rolled back)" : ""), e.undone ? "undone" : e.action)), el("td", { class: "num", text: e.version }), el("td", { class: "who", text: e.actor || "unknown (before v3)" })));
      }
      if (!m.history.length) { hb.append(el("tr", {}, el("td", { colspan: "5", class: "muted", text: "No alias changes yet." }))); }
      ht.append(hb);
      document.body.dataset.model = name;
    }
    const models = await loadModels();
    const want = decodeURIComponent(location.hash.slice(1)) || (models[0] && models[0].name);
    if (want) { await showModel(want); }
    window.addEventListener("hashchange", () => {  // a parent link is a link to #NAME
      const name = decodeURIComponent(location.hash.slice(1));
      if (name && name !== document.body.dataset.model) { showModel(name).catch((e) => toast(e.message, true)); }
    });
    document.body.dataset.ready = "1";
  }

  // each compressed version's report (OUT/report.json of `shipyard compress`): the CLI's table
  function reports(versions) {
    const box = $("#reports"); box.textContent = "";
    const shown = versions.filter((v) => v.compression && !v.compression.error);
    $("#reports-card").hidden = !shown.length;
    for (const v of shown) {
      const c = v.compression;
      const from = v.parent_version ? v.parent_version.name + " v" + v.parent_version.version : c.parent.name + " " + c.parent.version;
      const t = el("table", { class: "data report-table" });
      t.append(el("thead", {}, el("tr", {}, ...c.rows[0].map((h) => el("th", { text: h })))));
      const body = el("tbody");
      for (const r of c.rows.slice(1)) { body.append(el("tr", {}, ...r.map((x, i) => el("td", { class: i ? "num" : "", text: x })))); }
      t.append(body);
      box.append(el("section", { class: "report", "data-version": String(v.version) },
        el("h4", { text: "v" + v.version + " · " + c.method + " · from " + from }),
        el("div", { class: "table-wrap" }, t),
        el("p", { class: "muted small", text: "Measured on " + c.machine + "." }),
        el("p", { class: "muted small mono", text: c.path })));
    }
  }

  function metricsText(m) {
    if (!m) { return "–"; }
    const flat = [];
    const walk = (o, p) => { for (const [k, v] of Object.entries(o)) { if (v && typeof v === "object") { walk(v, p + k + "."); } else if (typeof v === "number") { flat.push(p + k + " " + fmt(v)); } } };
    walk(m, "");
    return flat.slice(0, 3).join("\n") || "–";
  }
  function lineageCell(v) {
    const l = v.lineage || {};
    const td = el("td", { class: "wrap small lineage" });
    const line = (label, value, href) => {
      const d = el("div", {}, el("span", { class: "muted", text: label + " " }));
      d.append(href ? el("a", { href, text: value }) : el("span", { class: "mono", text: value }));
      td.append(d);
    };
    if (v.run_id) { line("run", v.run_id, "/ui/runs/" + encodeURI(v.run_id)); } else if (l.run_dir) { line("run", String(l.run_dir)); }
    if (l.checkpoint_step !== undefined && l.checkpoint_step !== null) { line("step", String(l.checkpoint_step)); }
    if (l.data_fingerprint) { line("data", String(l.data_fingerprint).slice(0, 12)); }
    if (v.parent_version) { line("parent", v.parent_version.name + " v" + v.parent_version.version, "/ui/registry#" + encodeURIComponent(v.parent_version.name)); }
    else if (l.parent) { line("parent", typeof l.parent === "object" ? l.parent.name + " " + l.parent.version + " (not registered)" : String(l.parent)); }
    if (v.compression) {
      if (v.compression.error) { line("report", v.compression.error); }
      else { line("compressed", v.compression.method + " · report below"); }
    }
    if (l.git_commit) { line("git", String(l.git_commit).slice(0, 10)); }
    if (!td.childNodes.length) { td.textContent = "–"; }
    return td;
  }

  // -------------------------------------------------------------------------- server page

  async function serverPage() {
    const palette = window.ShipyardChart.palette();
    const charts = {};
    for (const id of ["m-rps", "m-lat", "m-err", "m-batch", "m-tps", "m-ttft"]) { charts[id] = new window.ShipyardChart.LineChart($("#" + id), { xLabel: "s", legend: id === "m-lat" }); }
    const hist = { rps: [], p50: [], p95: [], p99: [], err: [], batch: [], tps: [], ttft: [] };
    let prev = null, start = Date.now() / 1000;
    const quant = (cur, old, q) => {
      if (!cur) { return null; }
      const b = cur.buckets.map((x, i) => [x[0], x[1] - (old ? old.buckets[i][1] : 0)]);
      const total = b.length ? b[b.length - 1][1] : 0;
      if (total <= 0) { return null; }
      for (const [le, n] of b) { if (n >= q * total) { return le === null ? null : le; } }
      return null;
    };
    async function tick() {
      const [info, snap] = await Promise.all([api("/ui/api/server"), api("/ui/api/server/metrics")]);
      const h = $("#health"); h.textContent = info.ready ? "ready" : "not ready"; h.className = "badge " + (info.ready ? "ok" : "bad");
      // with --workers N each request reaches one worker: say whose view each part is
      const scope = $("#server-scope");
      const whose = snap.scope === "all-workers" ? "Charts: every worker's requests (Prometheus multiprocess)." : "Charts: this process's requests.";
      scope.textContent = info.workers > 1
        ? info.workers + " workers. " + whose + " Health, loaded models and load times: worker pid " + info.pid + ", the one that answered (each worker loads the same models)."
        : "1 process (pid " + info.pid + "). " + whose;
      scope.dataset.scope = snap.scope; scope.dataset.workers = String(info.workers);
      const t = $("#server-models"); t.textContent = "";
      t.append(el("thead", {}, el("tr", {}, ...["model", "version", "default", "task", "kind", "source", "loaded", "load time"].map((x) => el("th", { text: x })))));
      const body = el("tbody");
      for (const m of info.models) { body.append(el("tr", {}, el("td", {}, el("a", { href: "/ui/playground#" + encodeURIComponent(m.name), text: m.name })), el("td", { text: m.version }), el("td", { text: m.default ? "yes" : "" }), el("td", { text: m.task }), el("td", { text: m.kind }), el("td", { class: "mono small", text: m.source }), el("td", { text: when(m.loaded_at) }), el("td", { class: "num", text: fmt(m.load_seconds) + " s" }))); }
      if (!info.models.length) { body.append(el("tr", {}, el("td", { colspan: "8", class: "muted", text: "No models loaded (shipyard serve PACKAGE --ui serves some)." }))); }
      t.append(body);
      const now = Date.now() / 1000 - start;
      if (prev) {
        const dt = Math.max(1e-3, now - prev.t);
        const c = snap.counters, pc = prev.snap.counters, hs = snap.histograms, ph = prev.snap.histograms;
        const rate = (k) => ((c[k] || 0) - (pc[k] || 0)) / dt;
        const lat = hs.shipyard_request_duration_seconds, plat = ph.shipyard_request_duration_seconds;
        hist.rps.push([now, rate("shipyard_requests")]);
        hist.err.push([now, rate("shipyard_request_errors")]);
        hist.tps.push([now, rate("shipyard_generated_tokens")]);
        for (const [k, q] of [["p50", 0.5], ["p95", 0.95], ["p99", 0.99]]) { hist[k].push([now, quant(lat, plat, q)]); }
        const bs = hs.shipyard_batch_size_rows, pbs = ph.shipyard_batch_size_rows;
        const n = bs ? bs.count - (pbs ? pbs.count : 0) : 0;
        hist.batch.push([now, n > 0 ? (bs.sum - pbs.sum) / n : null]);
        hist.ttft.push([now, quant(hs.shipyard_time_to_first_token_seconds, ph.shipyard_time_to_first_token_seconds, 0.5)]);
        for (const k of Object.keys(hist)) { if (hist[k].length > 300) { hist[k].shift(); } }
        const line = (name, pts, i) => ({ name, color: palette[i], x: pts.map((p) => p[0]), y: pts.map((p) => (p[1] === null ? NaN : p[1])), best: null });
        charts["m-rps"].setData([line("requests/s", hist.rps, 0)]);
        charts["m-lat"].setData([line("p50", hist.p50, 0), line("p95", hist.p95, 3), line("p99", hist.p99, 1)]);
        charts["m-err"].setData([line("errors/s", hist.err, 1)]);
        charts["m-batch"].setData([line("rows/batch", hist.batch, 2)]);
        charts["m-tps"].setData([line("tokens/s", hist.tps, 4)]);
        charts["m-ttft"].setData([line("ttft p50", hist.ttft, 5)]);
      }
      prev = { t: now, snap };
      document.body.dataset.ready = "1";
    }
    await tick();
    setInterval(() => tick().catch(() => {}), 2000);
  }

  // ---------------------------------------------------------------------- playground page

  async function playgroundPage() {
    const info = await api("/ui/api/server");
    const sel = $("#pg-model");
    const names = [...new Set(info.models.map((m) => m.name))];
    for (const n of names) { sel.append(el("option", { value: n, text: n })); }
    $("#pg-empty").hidden = names.length > 0;
    const want = decodeURIComponent(location.hash.slice(1));
    if (names.includes(want)) { sel.value = want; }
    sel.addEventListener("change", () => { history.replaceState(null, "", "#" + encodeURIComponent(sel.value)); show(sel.value); });
    window.addEventListener("hashchange", () => {
      const name = decodeURIComponent(location.hash.slice(1));
      if (names.includes(name) && name !== sel.value) { sel.value = name; show(name); }
    });
    if (names.length) { await show(sel.value); }
    document.body.dataset.ready = "1";
  }

  let current = null;
  async function show(name) {
    const m = await api("/ui/api/server/models/" + encodeURIComponent(name));
    current = m;
    $("#pg-info").textContent = m.task + " · version " + m.version;
    $("#pg-tensor").hidden = m.kind !== "tensor";
    $("#pg-chat").hidden = m.kind === "tensor";
    if (m.kind === "tensor") { buildForm(m); }
  }

  function inputShape(m) { return m.inputs[0].shape.slice(1).map((d) => (d < 0 ? 1 : d)); }

  function buildForm(m) {
    const shape = inputShape(m);
    const n = shape.reduce((a, b) => a * b, 1);
    $("#pg-shape").textContent = "Input " + m.inputs[0].name + " · " + m.inputs[0].datatype + " · shape " + JSON.stringify(m.inputs[0].shape) + (n > 256 ? " (too many values for a form: paste JSON)" : "");
    const grid = $("#pg-grid"); grid.textContent = "";
    if (n <= 256) {
      const cols = shape.length >= 2 ? shape[shape.length - 1] : Math.min(n, 8);
      grid.style.gridTemplateColumns = "repeat(" + cols + ", max-content)";
      for (let i = 0; i < n; i++) { grid.append(el("input", { type: "number", step: "any", value: "0", "aria-label": "x" + i })); }
    }
    $("#pg-json").value = "";
  }

  function formValues() {
    const raw = $("#pg-json").value.trim();
    if (raw) {
      const flat = JSON.parse(raw).flat(Infinity);
      return flat.map(Number);
    }
    return [...document.querySelectorAll("#pg-grid input")].map((i) => Number(i.value) || 0);
  }

  async function predict() {
    const m = current;
    const shape = inputShape(m);
    let values;
    try { values = formValues(); } catch (e) { toast("the pasted values are not a JSON array: " + e.message, true); return; }
    const n = shape.reduce((a, b) => a * b, 1);
    if (values.length !== n) { toast("the input needs " + n + " values (shape " + JSON.stringify(shape) + "), got " + values.length, true); return; }
    const out = m.outputs.find((o) => o.name === "probabilities") || m.outputs[0];
    const body = { inputs: [{ name: m.inputs[0].name, datatype: m.inputs[0].datatype, shape: [1, ...shape], data: values }] };
    const t = performance.now();
    try {
      const r = await api("/v2/models/" + encodeURIComponent(m.name) + "/infer", { method: "POST", body });
      const ms = performance.now() - t;
      showResult(r, out, ms);
    } catch (e) { toast(e.message, true); }
  }

  function showResult(r, out, ms) {
    const box = $("#pg-result"); box.textContent = "";
    const k = Math.max(1, +$("#pg-k").value || 5);
    const o = r.outputs.find((x) => x.name === out.name) || r.outputs[0];
    const labels = current.labels;
    const scores = o.data;
    if (current.task === "classification" && labels && scores.length >= 2) {
      const order = scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]).slice(0, k);
      const bars = el("div", { class: "bars", id: "pg-topk" });
      const top = order[0][0] || 1;
      for (const [s, i] of order) {
        const bar = el("div", { class: "bar" }); bar.style.width = Math.max(1, s / top * 100) + "%";
        bars.append(el("span", { class: "mono", "data-label": labels[i] || String(i), text: labels[i] || String(i) }), el("div", {}, bar), el("span", { class: "num mono", text: fmt(s) }));
      }
      box.append(bars);
    } else {
      box.append(el("pre", { class: "code", id: "pg-topk", text: JSON.stringify(o.data.slice(0, 50)) }));
    }
    box.append(el("p", { class: "muted small", text: o.name + " · " + ms.toFixed(1) + " ms round trip" }));
  }

  // chat: POST /v1/chat/completions with stream=true, read the SSE body as it arrives
  const chat = [];
  function chatBody() {
    return {
      model: current.name, messages: chat.slice(), stream: true,
      temperature: +$("#chat-temp").value, top_p: +$("#chat-top-p").value,
      max_tokens: +$("#chat-max").value, seed: +$("#chat-seed").value,
    };
  }

  async function send() {
    const text = $("#chat-input").value;
    if (!text.trim()) { return; }
    $("#chat-input").value = "";
    chat.push({ role: "user", content: text });
    const log = $("#chat-log");
    log.append(el("div", { class: "msg user", text }));
    const out = el("div", { class: "msg assistant" });
    log.append(out);
    $("#chat-send").disabled = true;
    const t0 = performance.now();
    let first = null, tokens = 0, answer = "";
    try {
      const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(chatBody()) });
      if (!res.ok) { let msg = res.statusText; try { const j = await res.json(); msg = (j.error && (j.error.message || j.error)) || msg; } catch (e) { /* not JSON */ } throw new Error(msg); }
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) { break; }
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i); buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) { continue; }
            const payload = line.slice(5).trim();
            if (payload === "[DONE]") { continue; }
            const j = JSON.parse(payload);
            if (j.error) { throw new Error(j.error.message); }
            const delta = j.choices && j.choices[0] && j.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) { first = performance.now(); }
              tokens += 1; answer += delta.content; out.textContent = answer;
              log.scrollTop = log.scrollHeight;
            }
          }
        }
        stats(t0, first, tokens);
      }
      chat.push({ role: "assistant", content: answer });
      stats(t0, first, tokens);
    } catch (e) { out.textContent = answer + " [error: " + e.message + "]"; out.dataset.error = e.message; toast(e.message, true); }
    out.dataset.done = "1";
    $("#chat-send").disabled = false;
  }

  function stats(t0, first, tokens) {
    const now = performance.now();
    const ttft = first === null ? null : (first - t0) / 1000;
    const rate = first !== null && tokens > 1 && now > first ? (tokens - 1) / ((now - first) / 1000) : null;
    const s = $("#chat-stats");
    s.textContent = "time to first token " + (ttft === null ? "–" : ttft.toFixed(3) + " s") + " · " + tokens + " chunks · " + (rate === null ? "–" : rate.toFixed(1)) + " tokens/s";
    s.dataset.ttft = ttft === null ? "" : String(ttft);
  }

  function snippet(kind) {
    const body = chatBody();
    body.messages = chat.length ? chat.slice() : [{ role: "user", content: $("#chat-input").value || "Hello" }];
    const origin = location.origin;
    if (kind === "curl") {
      return "curl -N " + origin + "/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n  -H \"Authorization: Bearer $SHIPYARD_API_KEY\" \\\n  -d '" + JSON.stringify(body).replace(/'/g, "'\\''") + "'";
    }
    return "from openai import OpenAI\n\nclient = OpenAI(base_url=\"" + origin + "/v1\", api_key=os.environ.get(\"SHIPYARD_API_KEY\", \"none\"))\nstream = client.chat.completions.create(\n    model=" + JSON.stringify(body.model) + ",\n    messages=" + JSON.stringify(body.messages) + ",\n    temperature=" + body.temperature + ", top_p=" + body.top_p + ", max_tokens=" + body.max_tokens + ", seed=" + body.seed + ",\n    stream=True,\n)\nfor chunk in stream:\n    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n";
  }

  async function copy(kind) {
    let text = snippet(kind);
    if (kind !== "curl") { text = "import os\n" + text; }
    const pre = $("#chat-code"); pre.hidden = false; pre.textContent = text;
    try { await navigator.clipboard.writeText(text); toast("copied"); } catch (e) { toast("shown below (the clipboard needs a secure context)"); }
  }

  // ------------------------------------------------------------------------------- start

  function common() {
    $("#key-button").addEventListener("click", askKey);
    $("#key-dialog").addEventListener("close", () => {
      const d = $("#key-dialog");
      if (d.returnValue === "save" && $("#key-input").value.trim()) { sessionStorage.setItem(KEY, $("#key-input").value.trim()); location.reload(); }
      if (d.returnValue === "clear") {  // forget it here and end the cookie session
        sessionStorage.removeItem(KEY);
        fetch("/ui/logout", { method: "POST" }).finally(() => location.reload());
      }
    });
    $("#key-button").textContent = sessionStorage.getItem(KEY) ? "Key ✓" : "Key";
    const pg = $("#pg-run");
    if (pg) {
      pg.addEventListener("click", predict);
      $("#pg-clear").addEventListener("click", () => { for (const i of document.querySelectorAll("#pg-grid input")) { i.value = "0"; } $("#pg-json").value = ""; });
      $("#chat-send").addEventListener("click", send);
      $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
      $("#copy-curl").addEventListener("click", () => copy("curl"));
      $("#copy-python").addEventListener("click", () => copy("python"));
    }
  }

  const pages = { runs: runsPage, run: runPage, compare: comparePage, registry: registryPage, server: serverPage, playground: playgroundPage };
  document.addEventListener("DOMContentLoaded", () => {
    common();
    const page = pages[document.body.dataset.page];
    if (page) {
      page().catch((e) => { document.body.dataset.error = e.message; toast(e.message, true); });
    }
  });
})();
