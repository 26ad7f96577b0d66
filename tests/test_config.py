"""Config stage: loading, interpolation, .env, overrides, every problem reported at once, secrets masked."""
import codecs
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from sft.config import load_config, resolved_yaml
from sft.errors import UserError
from sft.run.directory import run_config
from sft.secrets import mask

MINIMAL = {"task": "classification", "model": {"name": "some/model"}, "data": {"train": "train.jsonl"}}


def test_defaults_reproduce_the_classic_recipe(write_config):
    config = load_config(write_config(MINIMAL))
    assert (config.training.epochs, config.training.batch_size, config.training.seed) == (3, 8, 42)
    assert config.training.eval_strategy == config.training.save_strategy == "epoch"
    assert config.method.name == "lora" and config.method.lora.target_modules == "all-linear"


def test_every_problem_is_reported_in_one_line_with_yaml_paths(write_config):
    path = write_config({"task": "classification", "model": {"name": "x", "nme": "y"},
                         "data": {"train": "a.jsonl", "eval_fracton": 0.1},
                         "training": {"lerning_rate": 1e-5, "epochs": "three", "batch_size": 0}})
    with pytest.raises(UserError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    assert "model.nme: unknown key — did you mean name?" in message
    assert "data.eval_fracton: unknown key — did you mean eval_fraction?" in message
    assert "training.lerning_rate: unknown key — did you mean learning_rate?" in message
    assert "training.epochs:" in message and "'three'" in message
    assert "training.batch_size: input should be greater than or equal to 1" in message


def test_data_source_errors_name_the_chosen_shape(write_config):
    with pytest.raises(UserError, match=r"data.train: expected a path, a list of paths"):
        load_config(write_config({**MINIMAL, "data": {"train": 5}}))
    with pytest.raises(UserError, match=r"data.eval.qery: unknown key — did you mean query\?"):
        load_config(write_config({**MINIMAL, "data": {"train": "a", "eval": {"database": "sqlite:///x", "qery": "q"}}}))


def test_cross_section_rules(write_config):
    lm = {**MINIMAL, "task": "causal_lm", "data": {"train": "a", "max_length": 1024},
          "training": {"max_tokens_per_batch": 512}}
    with pytest.raises(UserError, match="max_tokens_per_batch: 512 is below data.max_length 1024"):
        load_config(write_config(lm))
    flex_classifier = {**MINIMAL, "model": {"name": "m", "attn_implementation": "flex_attention"}}
    with pytest.raises(UserError, match="flex_attention is for packed causal_lm batches; use sdpa for classification"):
        load_config(write_config(flex_classifier))


def test_environment_interpolation_with_defaults_and_missing_names(write_config, monkeypatch):
    monkeypatch.setenv("DATA_PATH", "/project/data")
    monkeypatch.delenv("SFT_NOT_SET", raising=False)
    config = load_config(write_config({**MINIMAL, "data": {"train": "${DATA_PATH}/train.jsonl"},
                                       "output": {"dir": "${SFT_NOT_SET:-runs}/x"}}))
    assert config.data.train == "/project/data/train.jsonl" and config.output.dir == "runs/x"
    with pytest.raises(UserError, match=r"data.train: environment variable SFT_NOT_SET is not set"):
        load_config(write_config({**MINIMAL, "data": {"train": "${SFT_NOT_SET}/a.jsonl"}}))


def test_dotenv_file_from_config_flag_or_working_directory(write_config, tmp_path, monkeypatch):
    monkeypatch.delenv("SFT_TEST_DIR", raising=False)
    (tmp_path / "project.env").write_text("SFT_TEST_DIR=/from/flag\n")
    config_path = write_config({**MINIMAL, "data": {"train": "${SFT_TEST_DIR}/a.jsonl"}})
    assert load_config(config_path, env_file=str(tmp_path / "project.env")).data.train == "/from/flag/a.jsonl"

    monkeypatch.delenv("SFT_TEST_DIR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SFT_TEST_DIR=/from/cwd\n")
    assert load_config(config_path).data.train == "/from/cwd/a.jsonl"

    monkeypatch.delenv("SFT_TEST_DIR")
    with pytest.raises(UserError, match="env_file 'missing.env': file not found"):
        load_config(write_config({**MINIMAL, "env_file": "missing.env"}))


def test_relative_data_paths_are_found_from_the_current_directory_then_beside_the_config(tmp_path, monkeypatch):
    """The shipped layout: project/configs/x.yaml names data/train.jsonl, meaning project/data/train.jsonl. From the
    project directory that is the current directory's path, as always; from anywhere else sft finds it above the
    config's configs/ folder (or beside the config), and the current directory still wins when it has the path."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in (project / "configs", project / "data", elsewhere / "data", elsewhere / "sub"):
        folder.mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    (project / "configs" / "dev.jsonl").write_text("{}\n")
    config_path = project / "configs" / "x.yaml"
    config_path.write_text(yaml.safe_dump({**MINIMAL, "data": {"train": "data/train.jsonl",
                                                               "eval": [{"path": "dev.jsonl"}, "missing.jsonl"]}}))
    monkeypatch.chdir(elsewhere / "sub")
    config = load_config(Path("../../project/configs/x.yaml"))
    assert config.data.train == str(project / "data" / "train.jsonl")
    assert config.data.eval[0].path == str(project / "configs" / "dev.jsonl")
    assert config.data.eval[1] == "missing.jsonl"  # found nowhere: the data stage names where it looked
    (elsewhere / "sub" / "data").mkdir()
    (elsewhere / "sub" / "data" / "train.jsonl").write_text("{}\n")
    assert load_config(Path("../../project/configs/x.yaml")).data.train == "data/train.jsonl"


def test_relative_data_path_in_a_dotenv_is_relative_to_the_dotenv(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_PATH", raising=False)
    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / ".env").write_text("DATA_PATH=data\n")
    config_path = tmp_path / "project" / "x.yaml"
    config_path.write_text(yaml.safe_dump({**MINIMAL, "data": {"train": "${DATA_PATH}/train.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    config = load_config(config_path, env_file="project/.env")
    assert config.data.train == str(tmp_path / "project" / "data" / "train.jsonl")


def test_a_data_file_that_is_nowhere_names_the_directory_it_was_looked_up_from(tmp_path, monkeypatch):
    from sft.data.sources import file_fingerprint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"data.train: data/x.jsonl does not exist \(a relative path is looked up "
                                        rf"from {tmp_path}, then next to the config\)"):
        file_fingerprint("data/x.jsonl", "data.train")


@pytest.mark.parametrize("encode", [lambda text: codecs.BOM_UTF8 + text.encode(), lambda text: text.encode("utf-16"),
                                    lambda text: text.replace("\n", "\r\n").encode()], ids=["utf8-bom", "utf16", "crlf"])
def test_dotenv_files_saved_by_windows_editors(write_config, tmp_path, monkeypatch, encode):
    monkeypatch.delenv("SFT_TEST_DIR", raising=False)
    (tmp_path / "project.env").write_bytes(encode("SFT_TEST_DIR=/from/notepad\nOTHER=1\n"))
    config_path = write_config({**MINIMAL, "data": {"train": "${SFT_TEST_DIR}/a.jsonl"}})
    assert load_config(config_path, env_file=str(tmp_path / "project.env")).data.train == "/from/notepad/a.jsonl"
    monkeypatch.delenv("SFT_TEST_DIR")
    monkeypatch.delenv("OTHER")


def test_command_line_overrides_parse_yaml_values(write_config):
    config = load_config(write_config(MINIMAL), overrides=["training.epochs=1", "training.learning_rate=3e-5",
                                                           "method.name=full", "data.label_names=[neg, pos]",
                                                           "output.name={config}-{date}"])
    assert config.training.epochs == 1 and config.training.learning_rate == 3e-5
    assert config.method.name == "full" and config.data.label_names == ["neg", "pos"]
    assert config.output.name == "{config}-{date}"  # not YAML, so taken as the string it is
    with pytest.raises(UserError, match="training.epohcs: unknown key — did you mean epochs"):
        load_config(write_config(MINIMAL), overrides=["training.epohcs=1"])
    with pytest.raises(UserError, match="expected key.sub=value"):
        load_config(write_config(MINIMAL), overrides=["training.epochs"])


def test_secrets_are_masked_in_the_resolved_config(write_config, monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    config = load_config(write_config({
        **MINIMAL, "model": {"name": "org/${HF_TOKEN}"},
        "data": {"train": {"database": "sqlite:///db?password=${DB_PASSWORD}", "query": "SELECT 1"},
                 "eval": {"database": "postgresql://ann:plainpw@host/db", "query": "SELECT 2"}}}))
    text = resolved_yaml(config)
    assert "hunter2-secret" not in text and "hf_abcdefgh" not in text and "plainpw" not in text
    # YAML escapes non-ASCII letters in a quoted string: the value is masked before it is encoded.
    monkeypatch.setenv("API_TOKEN", "pässwörd1")
    config = load_config(write_config({**MINIMAL, "output": {"name": "run-${API_TOKEN}\ttab"}}))
    assert "ss" not in resolved_yaml(config).split("name:")[-1]
    assert "postgresql://ann:***@host/db" in text


def test_config_yaml_keeps_secret_references_and_every_other_value_as_it_ran(write_config, tmp_path, monkeypatch):
    """PGPASSWORD's value is also a word of the model's path and part of a longer word: config.yaml records the
    reference where the variable was used and nothing else changes, so what reads the run back gets real values."""
    monkeypatch.setenv("PGPASSWORD", "kestrel9")
    model = tmp_path / "kestrel9-X0l2" / "llama"
    database = "postgresql://ann:${PGPASSWORD}@host/db"
    config = load_config(write_config({**MINIMAL, "model": {"name": str(model)}, "output": {"name": "kestrel9s"},
                                       "data": {"train": {"database": database, "query": "SELECT 1"}}}))
    text = resolved_yaml(config)
    recorded = yaml.safe_load(text)
    assert recorded["model"]["name"] == str(model) and recorded["output"]["name"] == "kestrel9s"
    assert recorded["data"]["train"]["database"] == database and "kestrel9@" not in text
    # The same path in a log line stays whole; the value alone is masked.
    assert mask(f"loading {model}/config.json, password kestrel9") == f"loading {model}/config.json, password ***"

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(text)
    read_back = run_config(run_dir)
    assert read_back.model.name == str(model)
    assert read_back.data.train.database == "postgresql://ann:kestrel9@host/db"
    monkeypatch.delenv("PGPASSWORD")  # not set where the run is read (sft clean on a login node): left as written
    assert run_config(run_dir).data.train.database == database


def test_bad_yaml_points_at_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: causal_lm\nmodel:\n  name: [unclosed\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("config_file", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_documents_its_command(config_file: Path, monkeypatch):
    monkeypatch.setenv("DATA_PATH", "/project/data")
    text = config_file.read_text()
    assert text.startswith("#") and ("sft " in text.split("\n\n")[0] or "make demo" in text.split("\n\n")[0])
    config = load_config(config_file)
    assert yaml.safe_load(resolved_yaml(config))["task"] == config.task


def test_a_list_of_sources_mixes_kinds_and_names_errors_by_item(write_config):
    from sft.config import FileSource, SQLSource

    base = {"task": "causal_lm", "model": {"name": "m"}}
    config = load_config(write_config({**base, "data": {"train": [
        "a.jsonl", {"path": "b.parquet", "fraction": 0.5, "fields": {"prompt": "question"}},
        {"database": "sqlite:///x.db", "query": "SELECT 1", "max_rows": 10}]}}))
    first, second, third = config.data.train
    assert first == "a.jsonl" and isinstance(second, FileSource) and second.fields.prompt == "question"
    assert isinstance(third, SQLSource) and third.max_rows == 10 and third.timeout == 600
    with pytest.raises(UserError, match=r"data.train.1.qery: unknown key — did you mean query\?"):
        load_config(write_config({**base, "data": {"train": ["a.jsonl", {"database": "sqlite:///x.db", "qery": "S"}]}}))
    with pytest.raises(UserError, match=r"data.train.0.fraction: input should be less than or equal to 1"):
        load_config(write_config({**base, "data": {"train": [{"path": "a.jsonl", "fraction": 2}]}}))


def test_yaml_as_people_write_it(write_config, tmp_path):
    """Unquoted `no`/`off` (YAML 1.1 booleans) and numbers where the schema wants text."""
    path = tmp_path / "c.yaml"
    path.write_text("task: classification\nmodel: {name: m, revision: 2024}\ndata: {train: a.jsonl}\n"
                    "training: {eval_strategy: no, save_strategy: off}\noutput: {name: 7}\n")
    config = load_config(path)
    assert (config.training.eval_strategy, config.training.save_strategy) == ("no", "no")
    assert (config.model.revision, config.output.name) == ("2024", "7")
    path.write_text("task: classification\nmodel: {name: m, revision: yes}\ndata: {train: a.jsonl}\n")
    with pytest.raises(UserError, match='model.revision: .*got True: YAML reads unquoted yes/no/on/off/true/false as '
                                        'a boolean; quote the value'):
        load_config(path)
    assert load_config(write_config(MINIMAL), overrides=["training.eval_strategy=no"]).training.eval_strategy == "no"


def test_qlora_cannot_merge_into_its_4bit_base(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "causal_lm", "model": {"name": "m"}, "data": {"train": "a"},
                                    "method": {"name": "qlora", "merge": True}}))
    with pytest.raises(UserError, match="method.merge: not with qlora"):
        load_config(path)
