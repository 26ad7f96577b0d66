"""sft.load_run / sft.load_runs: a run's config, manifest and per-step metrics as a DataFrame, and a table of runs
whose columns include exactly the config keys that differ between them."""
import json

import sft


def test_load_run_gives_config_manifest_and_one_metrics_row_per_step(finished_runs):
    path = finished_runs["causal_lm", "lora"]
    run = sft.load_run(str(path))
    assert run.status == "finished" and run.config["method"]["name"] == "lora"
    assert run.manifest["data"]["files"][0]["sha256"]
    logged = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["loss"] for record in logged if "loss" in record}
    assert run.metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert run.metrics.set_index("step")["loss"].to_dict() == losses
    assert run.metrics["train_loss"].notna().sum() == 1  # the end-of-training record, merged into step 6


def test_load_runs_is_a_table_with_the_differing_config_keys_as_columns(finished_runs):
    table = sft.load_runs(str(next(iter(finished_runs.values())).parent))
    assert sorted(table.index) == sorted(path.name for path in finished_runs.values())
    differing = table.attrs["differing"]
    assert {"task", "method.name", "training.learning_rate"} <= set(differing)
    assert "output.name" not in differing and "training.seed" not in differing and "data.max_length" not in differing
    assert table.loc["causal_lm-lora", "method.name"] == "lora"
    assert table.loc["classification-full", "training.learning_rate"] == 3e-3
    assert (table["status"] == "finished").all() and (table["steps"] == 6).all()
    assert table.loc["classification-full", "train_loss"] == sft.load_run(
        str(finished_runs["classification", "full"])).manifest["results"]["train_loss"]


def test_load_runs_skips_a_run_that_never_wrote_its_config(finished_runs, tmp_path):
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / "manifest.json").write_text(json.dumps({"status": "starting", "name": "claimed"}))
    table = sft.load_runs(str(tmp_path))
    assert table.empty and table.attrs["differing"] == []
