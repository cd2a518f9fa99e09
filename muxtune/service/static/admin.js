// The operator's page: polls /admin/api/state and draws it. MiniChart is the page's chart library:
// line charts as inline SVG, no dependency, nothing fetched from elsewhere (the page works offline).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;

const MiniChart = {
  // series: [{points: [[x, y], ...], colour}]; draws axes with min/max labels and one polyline each
  line(series, {width = 290, height = 120, pad = 30} = {}) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const all = series.flatMap(s => s.points).filter(p => p[1] !== null && Number.isFinite(p[1]));
    if (all.length === 0) {
      svg.appendChild(MiniChart.text(width / 2, height / 2, "no steps yet", "middle", "#999"));
      return svg;
    }
    const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
    const sx = x => pad + (x - x0) / (x1 - x0) * (width - pad - 6);
    const sy = y => height - 16 - (y - y0) / (y1 - y0) * (height - 24);
    svg.appendChild(MiniChart.path(`M${pad},4 V${height - 16} H${width - 4}`, "#999"));
    svg.appendChild(MiniChart.text(pad - 3, 12, y1.toFixed(2), "end"));
    svg.appendChild(MiniChart.text(pad - 3, height - 16, y0.toFixed(2), "end"));
    svg.appendChild(MiniChart.text(pad, height - 3, String(x0), "start"));
    svg.appendChild(MiniChart.text(width - 4, height - 3, `step ${x1}`, "end"));
    for (const s of series) {
      const pts = s.points.filter(p => p[1] !== null && Number.isFinite(p[1]));
      if (pts.length === 0) continue;
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", s.colour);
      line.setAttribute("stroke-width", pts.length === 1 ? 4 : 1.5);
      line.setAttribute("stroke-linecap", "round");
      line.setAttribute("class", "series");
      svg.appendChild(line);
    }
    return svg;
  },
  // a horizontal bar: used of limit
  bar(used, limit, {width = 300, height = 14} = {}) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    const share = limit ? Math.min(1, used / limit) : 0;
    const back = document.createElementNS(SVG, "rect");
    back.setAttribute("width", width); back.setAttribute("height", height); back.setAttribute("fill", "#eee");
    const fill = document.createElementNS(SVG, "rect");
    fill.setAttribute("width", (width * share).toFixed(1)); fill.setAttribute("height", height);
    fill.setAttribute("fill", share > 0.9 ? "#c62828" : "#43a047");
    svg.append(back, fill);
    return svg;
  },
  path(d, colour) {
    const p = document.createElementNS(SVG, "path");
    p.setAttribute("d", d); p.setAttribute("stroke", colour); p.setAttribute("fill", "none");
    return p;
  },
  text(x, y, content, anchor, colour = "#555") {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10");
    t.setAttribute("text-anchor", anchor); t.setAttribute("fill", colour);
    t.textContent = content;
    return t;
  },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function mib(bytes) { return bytes === null || bytes === undefined ? "?" : `${(bytes / 2 ** 20).toFixed(0)} MiB`; }

function table(head, rows) {
  return el("table", {}, el("tr", {}, ...head.map(h => el("th", {}, h))),
            ...rows.map(r => el("tr", {}, ...r.map(c => el("td", {}, c)))));
}

function drawBackbones(backbones) {
  return backbones.map(b => el("div", {class: "backbone", "data-model": b.model},
    el("strong", {}, b.model), " ",
    el("span", {class: "muted"}, b.worker_pid ? `worker ${b.worker_pid}, ${b.steps} steps, ` +
       `${b.training_seconds.toFixed(1)} s training` : "no worker yet"),
    el("div", {}, `${b.tenants.length} tenant(s) in ${b.groups.length} fusion group(s): `,
       ...b.groups.map((g, i) => el("span", {class: "group"}, `group ${i + 1}: ${g.join(", ")}`))),
    el("div", {}, "memory ", MiniChart.bar(b.memory_bytes, b.memory_limit_bytes), " ",
       `${mib(b.memory_bytes)} of ${mib(b.memory_limit_bytes)}`)));
}

function drawJobs(jobs) {
  return jobs.map(j => el("div", {class: "job", "data-job": j.id},
    el("div", {class: "id"}, j.id),
    el("div", {}, `${j.org} · ${j.method} · `, el("span", {class: `status-${j.status}`}, j.status),
       ` · ${j.curve.length ? j.curve[j.curve.length - 1][0] : 0} steps`),
    MiniChart.line([{points: j.curve.map(p => [p[0], p[1]]), colour: "#1f77b4"},
                    {points: j.curve.map(p => [p[0], p[2]]), colour: "#ff7f0e"}])));
}

async function refresh() {
  const answer = await fetch("/admin/api/state", {credentials: "same-origin", cache: "no-store"});
  if (answer.status === 401 || answer.status === 403) { window.location = "/admin"; return; }
  const state = await answer.json();
  document.getElementById("backbones").replaceChildren(...drawBackbones(state.backbones));
  document.getElementById("queue").replaceChildren(state.queue.length
    ? table(["job", "organisation", "model", "status"], state.queue.map(q => [q.id, q.org, q.model, q.status]))
    : el("p", {class: "muted"}, "empty"));
  const statuses = [...new Set(Object.values(state.organisations).flatMap(Object.keys))].sort();
  document.getElementById("organisations").replaceChildren(table(["organisation", ...statuses],
    Object.entries(state.organisations).map(([org, counts]) => [org, ...statuses.map(s => String(counts[s] || 0))])));
  document.getElementById("jobs").replaceChildren(...drawJobs(state.jobs));
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.rendered = String(state.jobs.length);
}

function poll() {
  refresh().catch(err => { document.getElementById("updated").textContent = `update failed: ${err}`; })
           .finally(() => setTimeout(poll, POLL_MS));
}
poll();
