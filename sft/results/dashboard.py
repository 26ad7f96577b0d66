"""`sft runs DIR --html FILE`: one self-contained HTML page of the runs under DIR — the table (status, steps, best
evaluation, wall time, Slurm job, the config keys that differ between runs, a link to each report.md) and the loss
and evaluation curves of the selected runs overlaid. Everything is inline (data as JSON, SVG drawn by a short
script): it opens from a cluster's file browser or after `scp` to a laptop, with no network.

    sft runs runs/ --html runs/index.html
"""
import json
import os
import re
from datetime import datetime
from html import escape
from pathlib import Path

from sft.errors import UserError
from sft.files import write_text_atomic

# Per run and curve: enough to see the shape on a 900-pixel-wide chart, and 50 runs stay a few hundred kB.
MAX_POINTS = 400


def write_dashboard(output_dir: str | Path, html_file: str | Path) -> Path:
    from sft.results.notebook import differing_config_keys
    from sft.run.listing import list_runs

    folder, page = Path(output_dir), Path(html_file)
    if page.is_dir() or not page.parent.is_dir():
        raise UserError(f"--html {page}: " + ("is a directory; name a file in it, e.g. " + str(page / "index.html")
                                              if page.is_dir() else f"no folder {page.parent}; create it first"))
    runs = [run_data(folder / info.name, info, page.parent) for info in list_runs(folder)]
    configs = [run.pop("config") for run in runs]
    differing = differing_config_keys([config for config in configs if config])
    for run in runs:
        run["settings"] = {key: run["settings"].get(key) for key in differing}
    title = f"sft runs: {folder.resolve()}"
    write_text_atomic(page, render(title, {"runs": runs, "differing": differing,
                                           "generated": datetime.now().astimezone().isoformat(timespec="seconds")}))
    return page


def run_data(path: Path, info, page_folder: Path) -> dict:
    """What the page shows of one run: table cells, the differing-keys candidates, and its curves."""
    from sft.config import flatten
    from sft.run.manifest import read_manifest
    from sft.run.records import read_metrics

    try:
        manifest = read_manifest(path) or {}
    except (OSError, ValueError):
        manifest = {}
    config = _read_config(path)
    records = read_metrics(path)
    report = path / "report.md"
    return {"name": info.name, "status": info.status, "steps": info.steps, "best": info.best,
            "wall_seconds": wall_seconds(manifest), "slurm_job": info.slurm_job,
            "started": info.started.isoformat(timespec="seconds") if info.started else None,
            "report": os.path.relpath(report, page_folder) if report.is_file() else None,
            "config": config, "settings": flatten(config) if config else {},
            "loss": curve(records, "loss"), "eval": curve(records, eval_metric(records)),
            "eval_metric": eval_metric(records)}


def _read_config(path: Path) -> dict | None:
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def eval_metric(records: list[dict]) -> str:
    """The curve a user compares runs by: accuracy for classifiers (as `sft runs` ranks them), else eval loss."""
    return "eval_accuracy" if any("eval_accuracy" in record for record in records) else "eval_loss"


def curve(records: list[dict], metric: str) -> list[list[float]]:
    """[step, value] pairs, evenly thinned to MAX_POINTS (the last point always kept)."""
    points = [[record["step"], record[metric]] for record in records
              if isinstance(record.get(metric), (int, float)) and isinstance(record.get("step"), int)]
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS - 1)] + [points[-1]]


def wall_seconds(manifest: dict) -> float | None:
    """From the first start to the end (or to now, while it runs); includes queue time between restarts."""
    try:
        started = datetime.fromisoformat(manifest["started"])
        end = manifest.get("finished") or manifest.get("stopped")
        ended = datetime.fromisoformat(end) if end else datetime.now().astimezone()
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, (ended - started).total_seconds())


def render(title: str, data: dict) -> str:
    # "</" inside a script element would end it: a run name or config value could hold "</script>".
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    values = {"{title}": escape(title), "{data}": payload}
    return re.sub(r"\{title\}|\{data\}", lambda match: values[match[0]], PAGE)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
table { border-collapse: collapse; margin-bottom: 16px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
svg { border: 1px solid #ddd; background: #fff; }
svg text { font-size: 11px; fill: #555; }
path.curve { fill: none; stroke-width: 1.5; }
path.curve:hover { stroke-width: 3; }
.failed, .killed { color: #b00; } .running { color: #06c; } .preempted, .interrupted { color: #a60; }
</style></head>
<body>
<h2>{title}</h2>
<p id="summary"></p>
<p><button id="all">select all</button> <button id="none">select none</button></p>
<table id="runs"><thead></thead><tbody></tbody></table>
<div class="charts"><svg id="loss" width="600" height="300"></svg><svg id="eval" width="600" height="300"></svg></div>
<script type="application/json" id="data">{data}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const selected = new Set(data.runs.map(run => run.name));
const color = index => `hsl(${(index * 137.5) % 360}, 65%, 42%)`;
data.runs.forEach((run, index) => { run.color = color(index); });
const columns = [
  ["", run => run], ["run", run => run.name], ["status", run => run.status], ["steps", run => run.steps],
  ["best evaluation", run => run.best], ["wall time", run => run.wall_seconds], ["Slurm job", run => run.slurm_job],
  ...data.differing.map(key => [key, run => run.settings[key]]),
  ["report", run => run.report],
];
let sortColumn = -1, sortDescending = false;

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const hours = Math.floor(seconds / 3600), minutes = Math.floor(seconds % 3600 / 60);
  return hours ? `${hours}h ${minutes}m` : minutes ? `${minutes}m ${Math.round(seconds % 60)}s` : `${seconds.toFixed(0)}s`;
}

function cell(row, value, number) {
  const td = row.insertCell();
  if (number) td.className = "num";
  td.textContent = value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value)
    : typeof value === "number" && !Number.isInteger(value) ? +value.toPrecision(6) : value;
  return td;
}

function drawTable() {
  const head = document.querySelector("#runs thead"), body = document.querySelector("#runs tbody");
  head.innerHTML = ""; body.innerHTML = "";
  const header = head.insertRow();
  columns.forEach(([name], index) => {
    const th = document.createElement("th");
    th.textContent = name + (index === sortColumn ? (sortDescending ? " \\u25bc" : " \\u25b2") : "");
    th.onclick = () => { sortDescending = sortColumn === index && !sortDescending; sortColumn = index; drawTable(); };
    header.appendChild(th);
  });
  const runs = [...data.runs];
  if (sortColumn > 0) {
    const value = columns[sortColumn][1];
    runs.sort((a, b) => {
      const x = value(a), y = value(b);
      const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return sortDescending ? -order : order;
    });
  }
  for (const run of runs) {
    const row = body.insertRow();
    row.dataset.run = run.name;
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = selected.has(run.name);
    box.onchange = () => { box.checked ? selected.add(run.name) : selected.delete(run.name); drawCharts(); };
    const first = row.insertCell();
    first.appendChild(box);
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = run.color;
    first.appendChild(swatch);
    cell(row, run.name);
    cell(row, run.status).className = run.status;
    cell(row, run.steps, true); cell(row, run.best); cell(row, duration(run.wall_seconds), true);
    cell(row, run.slurm_job);
    data.differing.forEach(key => cell(row, run.settings[key]));
    const link = row.insertCell();
    if (run.report) {
      const a = document.createElement("a");
      a.href = run.report; a.textContent = "report.md";
      link.appendChild(a);
    }
  }
}

const SVG = "http://www.w3.org/2000/svg";
function element(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  parent.appendChild(node);
  return node;
}

function drawChart(svg, title, points) {
  svg.innerHTML = "";
  const width = +svg.getAttribute("width"), height = +svg.getAttribute("height");
  const left = 60, right = 12, top = 24, bottom = 30;
  const runs = data.runs.filter(run => selected.has(run.name) && points(run).length);
  element("text", {x: left, y: 16}, svg).textContent = title;
  const all = runs.flatMap(points);
  if (!all.length) {
    element("text", {x: left, y: height / 2}, svg).textContent = "no values logged for the selected runs";
    return;
  }
  const steps = all.map(p => p[0]), values = all.map(p => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)], [y0, y1] = [Math.min(...values), Math.max(...values)];
  const x = step => left + (x1 === x0 ? 0.5 : (step - x0) / (x1 - x0)) * (width - left - right);
  const y = value => height - bottom - (y1 === y0 ? 0.5 : (value - y0) / (y1 - y0)) * (height - top - bottom);
  element("line", {x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#999"}, svg);
  element("line", {x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#999"}, svg);
  for (const value of [y0, (y0 + y1) / 2, y1]) {
    element("text", {x: 4, y: y(value) + 4}, svg).textContent = value.toPrecision(4);
  }
  for (const step of [x0, Math.round((x0 + x1) / 2), x1]) {
    element("text", {x: x(step) - 8, y: height - 10}, svg).textContent = step;
  }
  element("text", {x: 4, y: height - 10}, svg).textContent = "step";
  for (const run of runs) {
    const line = points(run).map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    const path = element("path", {d: line, class: "curve", stroke: run.color, "data-run": run.name}, svg);
    element("title", {}, path).textContent = run.name;
  }
}

function drawCharts() {
  drawChart(document.getElementById("loss"), "training loss", run => run.loss);
  const metrics = [...new Set(data.runs.map(run => run.eval_metric))].join(" / ");
  drawChart(document.getElementById("eval"), metrics, run => run.eval);
}

document.getElementById("all").onclick = () => { data.runs.forEach(run => selected.add(run.name)); drawTable(); drawCharts(); };
document.getElementById("none").onclick = () => { selected.clear(); drawTable(); drawCharts(); };
document.getElementById("summary").textContent =
  `${data.runs.length} runs, written ${data.generated}` +
  (data.differing.length ? `; config keys that differ: ${data.differing.join(", ")}` : "");
drawTable();
drawCharts();
</script>
</body></html>
"""
