/* shipyard dashboard: a small canvas line chart (no dependencies).
 * Series: [{name, color, x: [...], y: [...], best: {x, y} | null}]. Smoothing is TensorBoard's
 * debiased exponential moving average; log scale on y; drag to zoom x, double-click to reset.
 * The zoom survives setData, so live updates do not throw the view away. */
"use strict";
(function () {
  const PAD = { l: 58, r: 14, t: 10, b: 30 };

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { return [lo]; }
    const raw = (hi - lo) / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) { out.push(+v.toPrecision(12)); }
    return out;
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) { return "–"; }
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(2); }
    return +v.toPrecision(4) + "";
  }

  function smooth(ys, weight) {
    if (!weight) { return ys; }
    const out = new Array(ys.length);
    let last = 0, n = 0;
    for (let i = 0; i < ys.length; i++) {
      last = last * weight + (1 - weight) * ys[i];
      n++;
      out[i] = last / (1 - Math.pow(weight, n));
    }
    return out;
  }

  class LineChart {
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.opts = Object.assign({ logY: false, smoothing: 0, xLabel: "", legend: true, maxPoints: 0 }, opts || {});
      this.series = [];
      this.zoom = null;
      this.drag = null;
      this.drawn = 0;
      this.tip = document.createElement("div");
      this.tip.className = "tooltip";
      this.tip.hidden = true;
      canvas.parentNode.appendChild(this.tip);
      if (this.opts.legend) {
        this.legendEl = document.createElement("div");
        this.legendEl.className = "legend";
        canvas.parentNode.appendChild(this.legendEl);
      }
      canvas.addEventListener("mousedown", (e) => { this.drag = { x0: e.offsetX, x1: e.offsetX }; });
      canvas.addEventListener("mousemove", (e) => this.onMove(e));
      canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; this.hover = null; this.draw(); });
      window.addEventListener("mouseup", () => this.onUp());
      canvas.addEventListener("dblclick", () => { this.zoom = null; this.draw(); });
      new ResizeObserver(() => this.draw()).observe(canvas);
      const mq = window.matchMedia("(prefers-color-scheme: dark)");
      if (mq.addEventListener) { mq.addEventListener("change", () => this.draw()); }
    }

    setData(series) { this.series = series; this.draw(); this.renderLegend(); }
    setLog(on) { this.opts.logY = !!on; this.draw(); }
    setSmoothing(w) { this.opts.smoothing = +w; this.draw(); }
    resetZoom() { this.zoom = null; this.draw(); }

    renderLegend() {
      if (!this.legendEl) { return; }
      this.legendEl.textContent = "";
      for (const s of this.series) {
        const span = document.createElement("span");
        const i = document.createElement("i");
        i.style.background = s.color;
        span.appendChild(i);
        span.appendChild(document.createTextNode(s.name + (s.best ? "  (best " + fmt(s.best.y) + " at " + fmt(s.best.x) + ")" : "")));
        this.legendEl.appendChild(span);
      }
    }

    bounds() {
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const s of this.series) {
        for (let i = 0; i < s.x.length; i++) {
          const x = s.x[i];
          if (x < x0) { x0 = x; } if (x > x1) { x1 = x; }
        }
      }
      if (this.zoom) { x0 = this.zoom[0]; x1 = this.zoom[1]; } else if (isFinite(x0) && x1 > x0) {
        const pad = (x1 - x0) * 0.015; x0 -= pad; x1 += pad;  // room for markers at the ends
      }
      for (const s of this.series) {
        const ys = s._ys || s.y;
        for (let i = 0; i < s.x.length; i++) {
          if (s.x[i] < x0 || s.x[i] > x1) { continue; }
          const y = ys[i];
          if (this.opts.logY && !(y > 0)) { continue; }
          if (y < y0) { y0 = y; } if (y > y1) { y1 = y; }
        }
      }
      if (!isFinite(x0)) { x0 = 0; x1 = 1; }
      if (x1 === x0) { x1 = x0 + 1; }
      if (!isFinite(y0)) { y0 = 0; y1 = 1; }
      if (this.opts.logY) {
        y0 = Math.log10(y0); y1 = Math.log10(y1);
        if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
      } else {
        if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
        const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
      }
      return { x0, x1, y0, y1 };
    }

    draw() {
      const c = this.canvas, dpr = window.devicePixelRatio || 1;
      const w = c.clientWidth, h = c.clientHeight;
      if (!w || !h) { return; }
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      }
      const g = c.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      for (const s of this.series) { s._ys = smooth(s.y, this.opts.smoothing); }
      const b = this.bounds();
      this.b = b;
      const pw = w - PAD.l - PAD.r, ph = h - PAD.t - PAD.b;
      const log = this.opts.logY;
      const X = (x) => PAD.l + (x - b.x0) / (b.x1 - b.x0) * pw;
      const Y = (y) => PAD.t + (1 - ((log ? Math.log10(y) : y) - b.y0) / (b.y1 - b.y0)) * ph;
      this.X = X; this.Y = Y; this.pw = pw;
      g.font = "11px " + (css("--font") || "sans-serif");
      g.strokeStyle = css("--grid"); g.fillStyle = css("--muted"); g.lineWidth = 1;
      const yt = log ? niceTicks(Math.floor(b.y0), Math.ceil(b.y1), Math.ceil(b.y1) - Math.floor(b.y0)).map((e) => Math.pow(10, e))
                     : niceTicks(b.y0, b.y1, Math.max(2, Math.floor(ph / 45)));
      g.textAlign = "right"; g.textBaseline = "middle";
      for (const t of yt) {
        const yy = Y(t);
        if (yy < PAD.t - 1 || yy > PAD.t + ph + 1) { continue; }
        g.beginPath(); g.moveTo(PAD.l, yy); g.lineTo(PAD.l + pw, yy); g.stroke();
        g.fillText(fmt(t), PAD.l - 6, yy);
      }
      g.textAlign = "center"; g.textBaseline = "top";
      for (const t of niceTicks(b.x0, b.x1, Math.max(2, Math.floor(pw / 90)))) {
        const xx = X(t);
        g.beginPath(); g.moveTo(xx, PAD.t); g.lineTo(xx, PAD.t + ph); g.stroke();
        g.fillText(fmt(t), xx, PAD.t + ph + 6);
      }
      if (this.opts.xLabel) { g.textAlign = "right"; g.fillText(this.opts.xLabel, PAD.l + pw, PAD.t + ph + 18); }
      g.save();
      g.beginPath(); g.rect(PAD.l, PAD.t, pw, ph); g.clip();
      let drawn = 0;
      for (const s of this.series) {
        const ys = s._ys;
        if (this.opts.smoothing && s.y.length > 1) {
          g.globalAlpha = 0.25; g.strokeStyle = s.color; g.lineWidth = 1;
          this.path(g, s.x, s.y, X, Y); g.globalAlpha = 1;
        }
        g.strokeStyle = s.color; g.lineWidth = 1.8;
        drawn += this.path(g, s.x, ys, X, Y);
        if (s.x.length === 1) {
          g.fillStyle = s.color; g.beginPath(); g.arc(X(s.x[0]), Y(ys[0]), 3, 0, 7); g.fill();
        }
        if (s.best && !(log && s.best.y <= 0)) {
          const bx = X(s.best.x), by = Y(s.best.y);
          g.fillStyle = css("--panel"); g.strokeStyle = s.color; g.lineWidth = 2;
          g.beginPath(); g.moveTo(bx, by - 6); g.lineTo(bx + 6, by); g.lineTo(bx, by + 6); g.lineTo(bx - 6, by); g.closePath();
          g.fill(); g.stroke();
        }
      }
      if (this.hover) {
        g.strokeStyle = css("--muted"); g.setLineDash([3, 3]);
        g.beginPath(); g.moveTo(this.hover, PAD.t); g.lineTo(this.hover, PAD.t + ph); g.stroke(); g.setLineDash([]);
      }
      g.restore();
      if (this.drag && Math.abs(this.drag.x1 - this.drag.x0) > 2) {
        g.fillStyle = css("--accent"); g.globalAlpha = 0.15;
        g.fillRect(Math.min(this.drag.x0, this.drag.x1), PAD.t, Math.abs(this.drag.x1 - this.drag.x0), ph);
        g.globalAlpha = 1;
      }
      g.strokeStyle = css("--border"); g.strokeRect(PAD.l + 0.5, PAD.t + 0.5, pw - 1, ph - 1);
      this.drawn = drawn;
      c.dataset.points = String(drawn);
      c.dataset.series = String(this.series.length);
    }

    path(g, xs, ys, X, Y) {
      let started = false, n = 0;
      g.beginPath();
      for (let i = 0; i < xs.length; i++) {
        const y = ys[i];
        if (!isFinite(y) || (this.opts.logY && !(y > 0))) { started = false; continue; }
        const px = X(xs[i]), py = Y(y);
        if (started) { g.lineTo(px, py); } else { g.moveTo(px, py); started = true; }
        n++;
      }
      g.stroke();
      return n;
    }

    onMove(e) {
      if (this.drag) { this.drag.x1 = e.offsetX; this.draw(); return; }
      if (!this.b || !this.series.length) { return; }
      const b = this.b;
      const x = b.x0 + (e.offsetX - PAD.l) / this.pw * (b.x1 - b.x0);
      const lines = [];
      for (const s of this.series) {
        if (!s.x.length) { continue; }
        let lo = 0, hi = s.x.length - 1;
        while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (s.x[mid] < x) { lo = mid; } else { hi = mid; } }
        const i = Math.abs(s.x[lo] - x) <= Math.abs(s.x[hi] - x) ? lo : hi;
        lines.push([s.name, s.x[i], (s._ys || s.y)[i], s.color]);
      }
      if (!lines.length) { return; }
      this.hover = this.X(lines[0][1]);
      this.tip.textContent = "";
      const head = document.createElement("div");
      head.textContent = (this.opts.xLabel || "x") + " " + fmt(lines[0][1]);
      this.tip.appendChild(head);
      for (const [name, , y, color] of lines) {
        const d = document.createElement("div");
        const i = document.createElement("i");
        i.style.display = "inline-block"; i.style.width = "8px"; i.style.height = "8px";
        i.style.marginRight = "6px"; i.style.background = color; i.style.borderRadius = "2px";
        d.appendChild(i); d.appendChild(document.createTextNode(name + ": " + fmt(y)));
        this.tip.appendChild(d);
      }
      this.tip.hidden = false;
      const left = Math.min(e.offsetX + 14, this.canvas.clientWidth - 180);
      this.tip.style.left = Math.max(0, left) + "px";
      this.tip.style.top = (e.offsetY + 10) + "px";
      this.draw();
    }

    onUp() {
      if (!this.drag) { return; }
      const d = this.drag; this.drag = null;
      if (Math.abs(d.x1 - d.x0) > 4 && this.b) {
        const b = this.b, inv = (px) => b.x0 + (px - PAD.l) / this.pw * (b.x1 - b.x0);
        const a = inv(Math.min(d.x0, d.x1)), z = inv(Math.max(d.x0, d.x1));
        if (z > a) { this.zoom = [a, z]; }
      }
      this.draw();
    }
  }

  window.ShipyardChart = { LineChart, fmt, palette: () => ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"].map(css) };
})();
