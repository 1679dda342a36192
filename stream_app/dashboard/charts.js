// lossguard's run charts (uPlot, vendored in ./vendor): one chart per metric over steps, every alert
// episode drawn where it fired — a line at its first step and a band to the step it resolved (or to
// the run's last step while it is open), coloured by severity, its message on hover.
// Used by the dashboard's run page and, inlined, by `lossguard report`.
"use strict";

const LG_SEVERITY_COLOURS = {critical: "#c62828", high: "#ef6c00", medium: "#f9a825", low: "#1e88e5"};
const LG_SEVERITY_RANK = {critical: 3, high: 2, medium: 1, low: 0};
const LG_METRICS = [
  ["loss", "loss"], ["val_loss", "validation loss"], ["grad_norm", "grad norm"], ["lr", "learning rate"],
  ["reward_mean", "reward (mean)"], ["kl", "KL"], ["entropy", "entropy"], ["response_length", "response length"],
];

function lgAlpha(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

// episodes: [{start, end, severity, alert_type, message, open}]; lastStep: the run's last step
function lgAlertPlugin(episodes, lastStep, tip) {
  const ordered = [...episodes].sort((a, b) => LG_SEVERITY_RANK[a.severity] - LG_SEVERITY_RANK[b.severity]);
  return {
    hooks: {
      draw: [u => {
        const ctx = u.ctx, {top, height} = u.bbox;
        ctx.save();
        for (const ep of ordered) {  // most severe drawn last, on top
          const colour = LG_SEVERITY_COLOURS[ep.severity] || "#777";
          const x0 = u.valToPos(ep.start, "x", true);
          const serious = LG_SEVERITY_RANK[ep.severity] >= 2;
          // a band from firing to resolved; an open episode reaches the last step, if it is serious
          // (many open low ones would cover the curve)
          const end = ep.end ?? (ep.open && serious ? lastStep : ep.start);
          const x1 = u.valToPos(end, "x", true);
          if (x1 > x0 + 1) {
            ctx.fillStyle = lgAlpha(colour, 0.1);
            ctx.fillRect(x0, top, x1 - x0, height);
          }
          ctx.strokeStyle = colour;
          ctx.lineWidth = (serious ? 2 : 1) * devicePixelRatio;
          ctx.beginPath();
          ctx.moveTo(x0, top);
          ctx.lineTo(x0, top + height);
          ctx.stroke();
          ctx.fillStyle = colour;  // a marker at the top of the line
          ctx.beginPath();
          ctx.arc(x0, top + 6 * devicePixelRatio, 5 * devicePixelRatio, 0, 2 * Math.PI);
          ctx.fill();
        }
        ctx.restore();
      }],
      setCursor: [u => {
        if (!tip) return;
        const left = u.cursor.left;
        let best = null, bestDist = 8;
        for (const ep of episodes) {
          const d = Math.abs(u.valToPos(ep.start, "x") - left);
          if (d <= bestDist) { best = ep; bestDist = d; }
        }
        if (best === null || left < 0) { tip.style.display = "none"; return; }
        tip.textContent = `step ${best.start}: ${best.severity.toUpperCase()} ${best.alert_type} — ${best.message}`;
        tip.style.borderColor = LG_SEVERITY_COLOURS[best.severity];
        tip.style.display = "block";
      }],
    },
  };
}

// history: {series: {name: [[step, value], ...]}, nonfinite: {name: [step, ...]}}
function lgDrawCharts(container, history, episodes, lastStep, width) {
  container.innerHTML = "";
  const plots = [];
  const series = (history && history.series) || {};
  const names = LG_METRICS.filter(([name]) => (series[name] || []).length > 0);
  for (const [name, label] of names) {
    const points = series[name];
    const box = document.createElement("div");
    box.className = "lg-chart";
    box.dataset.metric = name;
    const tip = document.createElement("div");
    tip.className = "lg-tip";
    container.appendChild(box);
    const bad = (history.nonfinite || {})[name] || [];
    const opts = {
      title: bad.length ? `${label} (non-finite values not drawn, the latest at step ${bad[bad.length - 1]})` : label,
      width: width || Math.max(320, Math.min(container.clientWidth || 900, 1100)),
      height: 220,
      // the x axis reaches the run's last step: a curve that ends in NaNs still shows the alert after it
      scales: {x: {time: false, range: (u, min, max) => [min, Math.max(max, lastStep ?? max, ...episodes.map(e => e.start))]}},
      legend: {live: true},
      series: [{label: "step"}, {label, stroke: "#37474f", width: 1.5, spanGaps: true, points: {show: false}}],
      axes: [{label: "step"}, {size: 70, values: (u, ticks) => ticks.map(v => +v.toPrecision(3))}],
      plugins: [lgAlertPlugin(episodes, lastStep ?? points[points.length - 1][0], tip)],
    };
    const plot = new uPlot(opts, [points.map(p => p[0]), points.map(p => p[1])], box);
    box.appendChild(tip);
    plots.push(plot);
  }
  if (!names.length) container.textContent = "No charted metrics yet (loss, grad norm, LR, ...).";
  return plots;
}
