"""sft runs DIR --html FILE: one self-contained page (nothing from the network) with every run, the config keys that
differ as columns, links to each report.md, and one loss curve per run — checked in a real headless chromium."""
import json
import math
import os
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from sft.cli import main
from sft.files import write_json_atomic
from sft.results.dashboard import MAX_POINTS, render


def make_sweep(output: Path, count: int, steps: int = 40) -> list[Path]:
    """COUNT finished runs of a learning-rate sweep (one failed, one preempted), each with a loss curve, evaluations
    every 10 steps and a report.md."""
    runs = []
    start = datetime(2026, 12, 1, 8, 0).astimezone()
    for index in range(count):
        path = output / f"sweep-lr{index}"
        path.mkdir(parents=True)
        rate = 1e-4 * (index + 1)
        status = {1: "failed", 2: "preempted"}.get(index, "finished")
        last = steps // 2 if status != "finished" else steps
        config = {"task": "classification", "model": {"name": "tiny"}, "training": {"learning_rate": rate, "seed": 1},
                  "output": {"dir": str(output), "name": path.name}}
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        write_json_atomic(path / "manifest.json", {
            "status": status, "name": path.name, "slurm_job": f"{1000 + index}",
            "started": (start + timedelta(minutes=index)).isoformat(),
            "finished" if status == "finished" else "stopped": (start + timedelta(minutes=index + 30)).isoformat()})
        records = []
        for step in range(1, last + 1):
            records.append({"step": step, "loss": 2 * math.exp(-step * rate * 100) + 0.01 * index})
            if step % 10 == 0:
                records.append({"step": step, "eval_loss": 2.1 * math.exp(-step * rate * 90), "eval_accuracy":
                                min(1.0, 0.3 + step * rate * 10)})
        (path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        (path / "report.md").write_text(f"# {path.name}\n")
        runs.append(path)
    return runs


def page_data(page: Path) -> dict:
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(), re.S)[1]
    return json.loads(payload.replace("<\\/", "</"))


def test_the_page_holds_every_run_the_differing_keys_and_relative_report_links(tmp_path, capsys):
    make_sweep(tmp_path / "runs", 4)
    page = tmp_path / "site" / "index.html"
    page.parent.mkdir()
    assert main(["runs", str(tmp_path / "runs"), "--html", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    data = page_data(page)
    assert [run["name"] for run in data["runs"]] == [f"sweep-lr{i}" for i in range(4)]
    assert data["differing"] == ["training.learning_rate"]  # not output.name, nor the shared seed
    first = data["runs"][0]
    assert first["settings"] == {"training.learning_rate": 1e-4}
    assert first["report"] == "../runs/sweep-lr0/report.md"
    assert (page.parent / first["report"]).is_file()
    assert (first["status"], first["steps"], first["slurm_job"], first["wall_seconds"]) == ("finished", 40, "1000",
                                                                                            1800)
    assert first["best"] == "eval_accuracy 0.34 @ 40" and first["eval_metric"] == "eval_accuracy"
    assert len(first["loss"]) == 40 and first["eval"][-1] == [40, pytest.approx(0.34)]
    assert data["runs"][1]["status"] == "failed" and data["runs"][1]["steps"] == 20


def test_nothing_is_loaded_from_the_network(tmp_path):
    make_sweep(tmp_path / "runs", 2)
    page = tmp_path / "index.html"
    main(["runs", str(tmp_path / "runs"), "--html", str(page)])
    html = page.read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html)
    assert not re.search(r"@import|url\(", html)
    assert re.findall(r"https?://[^\"'\s]+", html) == ["http://www.w3.org/2000/svg"]  # a namespace name, not fetched


def test_a_page_in_a_missing_folder_is_one_line_and_exit_code_2(tmp_path, capsys):
    make_sweep(tmp_path / "runs", 1)
    assert main(["runs", str(tmp_path / "runs"), "--html", str(tmp_path / "site" / "index.html")]) == 2
    assert capsys.readouterr().err == f"sft: error: --html {tmp_path}/site/index.html: no folder {tmp_path}/site; " \
                                      f"create it first\n"


def test_a_config_value_cannot_close_the_script_element():
    html = render("runs", {"runs": [{"name": "x", "settings": {"model.name": "</script><script>alert(1)"}}],
                           "differing": []})
    assert html.count("</script>") == 2  # the data block's and the code's own


def test_long_curves_are_thinned_keeping_the_last_point(tmp_path):
    make_sweep(tmp_path / "runs", 1, steps=3 * MAX_POINTS)
    page = tmp_path / "index.html"
    main(["runs", str(tmp_path / "runs"), "--html", str(page)])
    loss = page_data(page)["runs"][0]["loss"]
    assert len(loss) == MAX_POINTS and loss[0][0] == 1 and loss[-1][0] == 3 * MAX_POINTS


@pytest.mark.browser
def test_in_a_real_browser_every_run_is_listed_with_one_curve_each_and_no_console_errors(tmp_path):
    from browser import Browser

    count = 12
    make_sweep(tmp_path / "runs", count)
    page = tmp_path / "index.html"
    assert main(["runs", str(tmp_path / "runs"), "--html", str(page)]) == 0
    with Browser() as browser:
        assert browser.load(page) == []
        rows = browser.evaluate("[...document.querySelectorAll('#runs tbody tr')].map(row => row.dataset.run)")
        assert sorted(rows) == sorted(f"sweep-lr{i}" for i in range(count))
        header = browser.evaluate("[...document.querySelectorAll('#runs th')].map(th => th.textContent)")
        assert "training.learning_rate" in header and "Slurm job" in header
        curves = "[...document.querySelectorAll('#%s path.curve')].map(path => path.dataset.run)"
        assert sorted(browser.evaluate(curves % "loss")) == sorted(rows)
        assert len(browser.evaluate(curves % "eval")) == count
        # Unselecting a run takes its curves away; sorting by a column keeps every row.
        browser.evaluate("document.querySelector('#runs tbody tr[data-run=\"sweep-lr3\"] input').click()")
        assert "sweep-lr3" not in browser.evaluate(curves % "loss") and len(browser.evaluate(curves % "loss")) == count - 1
        browser.evaluate("document.querySelectorAll('#runs th')[3].click()")  # steps
        steps = browser.evaluate("[...document.querySelectorAll('#runs tbody tr')].map(row => +row.cells[3].textContent)")
        assert steps == sorted(steps) and len(steps) == count and steps[0] == 20
        assert browser.errors() == []
        # SFT_DASHBOARD_SCREENSHOT=docs/img/dashboard.png refreshes the documentation's picture.
        screenshot = Path(os.environ.get("SFT_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        browser.screenshot(screenshot, 1280, 820)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
