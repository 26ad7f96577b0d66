"""What README.md, docs/*.md and the usage comments atop configs/ and slurm/ show exists: every `sft ...` command
(in a ```bash block or a usage comment, also inside `apptainer run`/`podman run`) parses with sft's own parser and
its `key.sub=value` overrides validate against the config schema; so do the overrides given to the sbatch scripts
and every config key the prose names; the scripts, make targets and repository files named exist; the documented
`sft check configs/demo.yaml` runs. Nothing is trained or built here: tests/test_container.py and
tests/test_slurm.py run those commands for real."""
import ast
import contextlib
import io
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import REPO
from sft.cli import COMMANDS, build_parser, main
from sft.config import Config, load_config
from sft.errors import UserError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Shipped configs and sbatch scripts open with the commands that use them, in comments.
HEADERS = [*sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "slurm").glob("*.sbatch"))]
SECTIONS = ("task", "model", "data", "method", "training", "output", "env_file")
# Names the docs use for "your file here"; anything else that looks like a repository path must exist.
PLACEHOLDER = re.compile(r"\b(x|my_run|CONFIG|RUN_DIR|JOBID|KEY|MODULE|N)\b|[<>*{}$]|\.\.\.")
REPO_DIRS = ("configs/", "slurm/", "docs/", "sft/", "tests/", "container/", "data/demo", "bench/")
REPO_FILES = ("Makefile", "Containerfile", "apptainer.def", "requirements.lock", "requirements.in",
              "requirements-dev.txt", "entrypoint.py", "pyproject.toml", "README.md")
# Overrides for a placeholder config (configs/x.yaml) are checked against the demo's config.
DEMO = REPO / "configs" / "demo.yaml"
# The scripts that take CONFIG [key.sub=value ...].
SHIPPED_SCRIPTS = ("train.sbatch", "train_multi.sbatch", "sweep.sbatch")
# Dotted names in the docs that are not config keys: manifest.json's own keys.
NOT_CONFIG_KEYS = {"data.summary"}


@dataclass
class Command:
    words: list[str]
    where: str  # file:line, for the failure message


def bash_commands() -> list[Command]:
    """Every simple command in the docs' ```bash blocks and in the usage comments at the top of the shipped configs
    and sbatch scripts, with leading VAR=value assignments dropped."""
    blocks = []  # (file name, first line number, text)
    for doc in DOCS:
        text = doc.read_text()
        blocks += [(doc.name, text.count("\n", 0, block.start(1)) + 1, block[1])
                   for block in re.finditer(r"```bash\n(.*?)```", text, re.S)]
    for header in HEADERS:
        lines = header.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            usage = re.match(r"#\s{2,}((?:\S+=\S+\s+)*(?:sft|sbatch|apptainer|podman|mkdir)\b.*)", line)
            if usage:  # a `\` continuation goes on in the next comment line
                follow = lines[number].lstrip("# ") if line.endswith("\\") else ""
                blocks.append((header.name, number, usage[1] + "\n" + follow))
    commands = []
    for name, first_line, block in blocks:
        for offset, line in logical_lines(block):
            for words in split_commands(line):
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                    words = words[1:]
                words = without_optional_parts(words)
                if words:
                    commands.append(Command(words, f"{name}:{first_line + offset}"))
    return commands


def logical_lines(block: str) -> list[tuple[int, str]]:
    """Lines with `\\` continuations joined, each with the offset of its first line."""
    lines, start, current = [], 0, ""
    for number, line in enumerate(block.splitlines()):
        if not current:
            start = number
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append((start, current + line))
            current = ""
    return lines


def without_optional_parts(words: list[str]) -> list[str]:
    """Usage notation: `sft fetch MODEL [--revision COMMIT]`, `CONFIG [key.sub=value ...]` show what may follow."""
    kept, optional = [], False
    for word in words:
        optional = optional or word.startswith("[")
        if not optional:
            kept.append(word)
        optional = optional and not word.endswith("]")
    return kept


def split_commands(line: str) -> list[list[str]]:
    """Shell words split at `&&`, `||`, `;`, `|` and command substitutions `$( ... )`; comments dropped;
    a `<placeholder with spaces>` is one word."""
    line = re.sub(r"<[^<>]*>", "<x>", line).replace("$(", "(")
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if set(token) <= set(";&|()"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [words for words in commands + [words] if words]


def sft_arguments(command: Command) -> list[str] | None:
    """The arguments sft gets from this command line, or None when it does not run sft."""
    words = command.words
    if Path(words[0]).name == "sft":
        return words[1:]
    if words[0] in ("apptainer", "singularity") and words[1] == "run":
        image = next(i for i, word in enumerate(words) if word.endswith(".sif"))
        return words[image + 1:]
    if words[0] in ("podman", "docker") and words[1] == "run" and "--entrypoint" not in words:
        image = next(i for i, word in enumerate(words) if word.startswith(("localhost/sft", "sft:")))
        return words[image + 1:]
    return None


def check_sft_arguments(argv: list[str], where: str) -> None:
    """Parse as `sft.cli.main` does (a bare config means train; overrides may follow options), then validate the
    config path and overrides against the schema."""
    argv = list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        argv.insert(argv.index(first), "train")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args, extras = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `sft {shlex.join(argv)}` does not parse: {errors.getvalue().strip()}")
    overrides = getattr(args, "overrides", None)
    wrong = [extra for extra in extras if overrides is None or extra.startswith("-") or "=" not in extra]
    assert not wrong, f"{where}: `sft {shlex.join(argv)}`: sft does not take {wrong}"
    if hasattr(args, "config"):
        check_overrides(args.config, (overrides or []) + extras, where)


def check_overrides(config: str, overrides: list[str], where: str) -> None:
    path = REPO / config
    if not path.is_file():
        assert PLACEHOLDER.search(config) or config.startswith("/"), f"{where}: no config {config}"
        path = DEMO
    try:
        load_config(path, overrides)
    except UserError as error:
        pytest.fail(f"{where}: {config} {' '.join(overrides)}: {error}")


def schema_has(key: str) -> bool:
    """Whether a dotted config key (`training.learning_rate`) names a field of the schema."""
    model: type[BaseModel] | None = Config
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Configs that read ${DATA_PATH} get one; no .env from the developer's checkout leaks in."""
    monkeypatch.setenv("DATA_PATH", "/data")
    monkeypatch.chdir(tmp_path)


def test_docs_have_commands_to_check():
    commands = bash_commands()
    assert sum(sft_arguments(c) is not None for c in commands) >= 10
    assert sum(c.words[0] == "sbatch" for c in commands) >= 10


def test_every_sft_command_shown_parses_and_its_overrides_validate():
    for command in bash_commands():
        argv = sft_arguments(command)
        if argv is not None:
            check_sft_arguments(argv, command.where)


def test_the_readme_shows_every_command():
    readme = (REPO / "README.md").read_text()
    missing = [command for command in COMMANDS if not re.search(rf"\bsft {command}\b", readme)]
    assert not missing, f"README.md never shows these commands: {missing}"


def test_every_sbatch_line_names_a_script_that_exists_with_valid_overrides():
    for command in bash_commands():
        if command.words[0] not in ("sbatch", "bash") or "--wrap" in command.words:
            continue
        scripts = [i for i, word in enumerate(command.words) if word.startswith("slurm/")]
        assert scripts, f"{command.where}: no slurm/ script in `{shlex.join(command.words)}`"
        script, *rest = command.words[scripts[0]:]
        assert (REPO / script).is_file(), f"{command.where}: no {script}"
        if Path(script).name in SHIPPED_SCRIPTS:
            assert rest, f"{command.where}: {script} needs a config"
            check_overrides(rest[0], rest[1:], command.where)


def test_every_make_target_shown_exists_and_dry_runs():
    targets = makefile_targets()
    for command in bash_commands():
        if command.words[0] != "make":
            continue
        wanted = [word for word in command.words[1:] if not word.startswith("-") and "=" not in word]
        assert set(wanted) <= targets, f"{command.where}: no make target {set(wanted) - targets}"
        dry = subprocess.run(["make", "-n", "-C", str(REPO), *command.words[1:]], capture_output=True, text=True)
        assert dry.returncode == 0, f"{command.where}: make -n {' '.join(command.words[1:])}: {dry.stderr}"


def test_every_config_key_named_in_the_docs_exists():
    """`training.ddp_backend`, `method.lora.r=8`: inline code and bash words alike."""
    key = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z_]+)+)(?=[=:`\s]|$)")
    file_name = re.compile(r"\.(jsonl|json|csv|parquet|md|yaml|py|txt|sh|log|db|lock|sbatch)$")
    unknown = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            for span in re.findall(r"`([^`]+)`", line) or ([line] if line.startswith(("sft", "sbatch")) else []):
                if "unknown key" in span:  # the docs show the error a misspelt key gets
                    continue
                for name in key.findall(span):
                    if not file_name.search(name) and name not in NOT_CONFIG_KEYS and not schema_has(name):
                        unknown.append(f"{doc.name}:{number}: {name}")
    assert not unknown, "config keys that the schema does not have (see docs/config.md):\n" + "\n".join(unknown)


def test_every_repository_file_named_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for number, line in enumerate(text.splitlines(), start=1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):  # markdown links, relative to the doc
                target = target.split("#")[0]
                if target and not target.startswith(("http://", "https://", "mailto:")):
                    if not (doc.parent / target).exists():
                        missing.append(f"{doc.name}:{number}: link {target}")
            for word in re.findall(r"[\w./-]+", line):
                word = word.rstrip(".")
                if word.startswith(REPO_DIRS) or word in REPO_FILES:
                    if not PLACEHOLDER.search(word) and not (REPO / word).exists():
                        missing.append(f"{doc.name}:{number}: {word}")
    assert not missing, "files the docs name that do not exist:\n" + "\n".join(missing)


def test_sft_check_on_the_shipped_demo_config_runs(capsys, monkeypatch):
    """The one documented command that needs no data of the user's: it really runs (no torch, seconds)."""
    shown = [c for c in bash_commands() if sft_arguments(c) and sft_arguments(c)[:2] == ["check", "configs/demo.yaml"]]
    assert shown, "the docs no longer show `sft check configs/demo.yaml`"
    monkeypatch.chdir(REPO)  # the demo config names its data relative to the repository
    assert main(sft_arguments(shown[0])) == 0
    assert "OK" in capsys.readouterr().out


def quoted_errors() -> list[tuple[str, str]]:
    """(file:line, message) of every `sft: error: ...` line the docs quote, in a code block or inline code."""
    quotes = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            spans = re.findall(r"`(sft: error: [^`]+)`", line) or ([line] if line.startswith("sft: error: ") else [])
            quotes += [(f"{doc.name}:{number}", span.removeprefix("sft: error: ")) for span in spans]
    return quotes


def message_patterns() -> list[re.Pattern]:
    """Every string and f-string in sft/ as a pattern: the literal text as written, any value in place of each {}."""
    patterns = []
    for module in (REPO / "sft").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.JoinedStr):
                parts = [re.escape(part.value) if isinstance(part, ast.Constant) else ".+" for part in node.values]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = [re.escape(node.value)]
            else:
                continue
            if len("".join(parts)) > 20:
                patterns.append(re.compile("".join(parts), re.S))
    return patterns


def test_every_error_line_the_docs_quote_is_one_the_code_writes():
    """A quoted message is one problem of an `sft: error:` line (several are joined with '; '): it must read as a
    message in sft/ reads, with values in place of its {} fields."""
    quotes = quoted_errors()
    assert len(quotes) >= 6, "the docs no longer quote the error lines troubleshooting.md explains"
    patterns = message_patterns()
    differ = [f"{where}: {message}" for where, message in quotes
              if not any(pattern.fullmatch(message) for pattern in patterns)]
    assert not differ, "error lines the docs quote that sft does not write (copy the real line):\n" + "\n".join(differ)



def test_docs_do_not_point_at_issue_numbers():
    """The docs describe what the tool does now; 'being added (issue 11)' goes stale the day it is done."""
    stale = [f"{doc.name}:{number}: {line.strip()}" for doc in DOCS
             for number, line in enumerate(doc.read_text().splitlines(), start=1)
             if re.search(r"\bissues? #?\d+|being added", line, re.I)]
    assert not stale, "\n".join(stale)


def test_the_exit_codes_sft_uses_are_documented():
    from sft.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USER_ERROR

    text = (REPO / "docs" / "troubleshooting.md").read_text()
    codes = text[text.index("Exit codes"):].split("\n\n")[0]
    for code in (0, EXIT_USER_ERROR, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        assert re.search(rf"\b{code} ", codes), f"troubleshooting.md does not say what exit code {code} means"


def test_gitignore_keeps_user_outputs_and_data_out_but_the_demo_data_in():
    """What the README's commands make in a clone (`--to models/NAME`, `--output predictions.jsonl`, data under
    data/) is ignored; the shipped demo data is not."""
    paths = ["models/NAME/model.safetensors", "predictions.jsonl", "data/train.jsonl", "data/demo/reviews.jsonl"]
    result = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *paths], capture_output=True,
                            text=True)
    assert result.stdout.split() == paths[:3]


def test_sweep_default_learning_rates_lie_in_the_range_the_swept_configs_advise():
    """The docs sweep configs/sft_v1.yaml (full fine-tuning, 'the BERT paper's range is 2e-5..5e-5'): the script's
    default rates, and the ones slurm.md states, must be rates that config's own comment recommends."""
    default = re.search(r"SFT_SWEEP_LRS:-([^}]*)}", (REPO / "slurm" / "sweep.sbatch").read_text())[1]
    assert f"`{default}`" in (REPO / "docs" / "slurm.md").read_text()
    swept = {c.words[i + 1] for c in bash_commands() for i, word in enumerate(c.words[:-1])
             if word.endswith("sweep.sbatch") and (REPO / c.words[i + 1]).is_file()}
    assert swept
    for config in swept:
        advice = re.search(r"learning_rate:.*?([\d.]+e-\d+)\.\.([\d.]+e-\d+)", (REPO / config).read_text())
        assert advice, f"{config}: no learning-rate range in its comments"
        low, high = float(advice[1]), float(advice[2])
        assert all(low <= float(rate) <= high for rate in default.split()), f"{config}: {default} vs {advice[0]}"


def test_every_container_command_shown_binds_the_data_at_data_and_at_its_own_path():
    """The bind contract of docs/container.md, as slurm/common.sh applies it: the data folder is bound read-only at
    /data and at its host path, so a DATA_PATH written as the host path (docs/cluster.md) works in every way of
    running the image, by hand or by script."""
    checked = 0
    for command in bash_commands():
        words = command.words
        if words[0] not in ("apptainer", "singularity", "podman", "docker") or words[1] not in ("run", "exec"):
            continue
        binds = [value for option, value in zip(words, words[1:]) if option in ("--bind", "-B", "-v", "--volume")]
        sources = {bind.split(":")[0] for bind in binds if bind.split(":")[1] == "/data"}
        for source in sources:
            checked += 1
            assert any(bind.split(":")[:2] == [source, source] for bind in binds), \
                f"{command.where}: binds {source} at /data but not at its own path ({shlex.join(words)})"
    assert checked >= 2


def test_cluster_guide_shows_every_runtime_the_scripts_take_and_the_gres_escape():
    """A newcomer without Apptainer follows docs/cluster.md only: each SFT_RUNTIME that slurm/common.sh accepts
    besides the default, and `--gres=none` for nodes without GPU gres, must be shown there."""
    setup = (REPO / "slurm" / "common.sh").read_text()
    runtimes = re.search(r"use ([a-z, -]+) or ([a-z-]+)\"", setup)
    accepted = {*runtimes[1].split(", "), runtimes[2]} - {"auto", "apptainer"}
    guide = (REPO / "docs" / "cluster.md").read_text()
    missing = [f"SFT_RUNTIME={runtime}" for runtime in sorted(accepted) if f"SFT_RUNTIME={runtime}" not in guide]
    assert "none" in accepted and not missing and "--gres=none" in guide, missing
