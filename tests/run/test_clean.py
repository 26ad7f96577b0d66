"""sft clean: a finished run loses exactly its checkpoints and tokenized data cache (sizes as measured here), keeps
everything else byte for byte, and a running or unfinished run is refused untouched."""
import json
import os
import shutil
from pathlib import Path

import pytest

from sft.cli import main
from sft.errors import UserError
from sft.files import write_json_atomic
from sft.run.clean import clean


def bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def contents(folder: Path, skip: set[str] = frozenset()) -> dict[Path, bytes]:
    return {f.relative_to(folder): f.read_bytes() for f in folder.rglob("*")
            if f.is_file() and f.relative_to(folder).parts[0] not in skip}


def copy_run(finished_runs, output: Path, name: str) -> Path:
    return Path(shutil.copytree(finished_runs["classification", "full"], output / name))


def set_status(run_dir: Path, status: str) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    write_json_atomic(run_dir / "manifest.json", {**manifest, "status": status})


def test_clean_frees_checkpoints_and_the_data_cache_and_keeps_the_rest(finished_runs, tmp_path, capsys):
    output = tmp_path / "runs"
    run_dir = copy_run(finished_runs, output, "done")
    key = json.loads((run_dir / "manifest.json").read_text())["data"]["cache_key"]
    cache = Path(os.environ["HF_HOME"]) / "sft" / "tokenized" / key
    assert json.loads((run_dir / "manifest.json").read_text())["data"]["cache_folder"] == str(cache)
    assert len(list((run_dir / "checkpoints").iterdir())) == 2 and cache.is_dir()
    sizes = {f"{run_dir / 'checkpoints'}/": bytes_under(run_dir / "checkpoints"),
             f"tokenized data cache {cache}/": bytes_under(cache)}
    kept = contents(run_dir, skip={"checkpoints", "run.lock"})
    assert {"final", "manifest.json", "metrics.jsonl", "config.yaml"} <= {p.parts[0] for p in kept}

    # A preempted run beside it, on the same data, still needs the cache.
    sibling = copy_run(finished_runs, output, "queued")
    set_status(sibling, "preempted")
    shared = clean(run_dir, dry_run=True)
    assert shared.removed == {f"{run_dir / 'checkpoints'}/": sizes[f"{run_dir / 'checkpoints'}/"]}
    assert shared.notes == [f"kept the tokenized data cache {cache}: unfinished run(s) queued use it"]
    shutil.rmtree(sibling)

    assert main(["clean", str(run_dir), "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out
    assert (run_dir / "checkpoints").is_dir() and cache.is_dir()  # a dry run removes nothing

    result = clean(run_dir)
    assert result.removed == sizes and result.freed == sum(sizes.values()) and not result.notes
    assert not (run_dir / "checkpoints").exists() and not cache.exists()
    assert contents(run_dir, skip={"run.lock"}) == kept
    assert set(result.kept) == {p.parts[0] + ("/" if (run_dir / p.parts[0]).is_dir() else "") for p in kept}

    assert main(["clean", str(run_dir)]) == 0  # again: nothing left to free
    assert capsys.readouterr().out.startswith("freed 0 B; kept ")


def test_running_and_unfinished_runs_are_refused_untouched(finished_runs, tmp_path, run_owner, capsys):
    run_dir = copy_run(finished_runs, tmp_path / "runs", "live")
    set_status(run_dir, "running")
    before = contents(run_dir, skip={"run.lock"})
    owner = run_owner(run_dir)
    with pytest.raises(UserError, match=f"belongs to a run that is still going .*pid {owner.pid}"):
        clean(run_dir)
    owner.kill()
    owner.wait()
    with pytest.raises(UserError, match="the run is killed, not finished; its checkpoints are where it resumes"):
        clean(run_dir)
    set_status(run_dir, "preempted")
    before["manifest.json"] = (run_dir / "manifest.json").read_bytes()
    assert main(["clean", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the run is preempted, not finished" in error
    assert contents(run_dir, skip={"run.lock"}) == {Path(k): v for k, v in before.items()}
    assert main(["clean", str(tmp_path)]) == 2  # not a run directory


def set_cache_folder(run_dir: Path, folder: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    write_json_atomic(run_dir / "manifest.json", {**manifest, "data": {**manifest["data"], "cache_folder": str(folder)}})


def test_clean_removes_the_cache_folder_the_run_recorded_wherever_hf_home_points_now(finished_runs, tmp_path):
    """Trained with another HF_HOME (the container's /cache): the recorded folder goes, not a guess from HF_HOME."""
    run_dir = copy_run(finished_runs, tmp_path / "runs", "done")
    key = json.loads((run_dir / "manifest.json").read_text())["data"]["cache_key"]
    recorded = tmp_path / "container-cache" / "sft" / "tokenized" / key
    (recorded / "train").mkdir(parents=True)
    (recorded / "train" / "data.arrow").write_bytes(b"x" * 100)
    set_cache_folder(run_dir, recorded)
    result = clean(run_dir)
    assert result.removed[f"tokenized data cache {recorded}/"] == 100 and not recorded.exists()


def test_a_cache_folder_found_nowhere_is_said_not_passed_over(finished_runs, tmp_path, monkeypatch):
    run_dir = copy_run(finished_runs, tmp_path / "runs", "done")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "venv-hf-home"))
    set_cache_folder(run_dir, Path("/cache/huggingface/sft/tokenized/abc"))
    result = clean(run_dir)
    assert not any(what.startswith("tokenized data cache") for what in result.removed)
    assert len(result.notes) == 1 and "no tokenized data cache at /cache/huggingface/sft/tokenized/abc (recorded " \
        "by the run) or " in result.notes[0] and "clean there or set HF_HOME" in result.notes[0]


def test_a_finished_run_without_final_keeps_its_checkpoints(finished_runs, tmp_path, capsys):
    """final/ moved or deleted: the checkpoints are the only trained model left."""
    run_dir = copy_run(finished_runs, tmp_path / "runs", "done")
    shutil.rmtree(run_dir / "final")
    before = contents(run_dir, skip={"run.lock"})
    assert main(["clean", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "final/ is missing, so its checkpoints are the only trained model left" in error
    assert contents(run_dir, skip={"run.lock"}) == before
