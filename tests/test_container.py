"""Container images (Containerfile, apptainer.def, container/): the two recipes stay in step and lint clean; and,
marked `container` (root + podman, installed here when missing), both really build and honour the bind contract,
and slurm/train.sbatch runs the OCI image with SFT_RUNTIME=podman on a real Slurm (also marked `slurm`, ~45 s).

    .venv/bin/python -m pytest tests/test_container.py -m "not container"   # recipe checks, about a second
    .venv/bin/python -m pytest tests/test_container.py                      # + builds: 4.5 min cold, 3 cached

apptainer.def cannot be built here (no Apptainer package for this OS); container/defrun.py replays its sections
with podman in Apptainer's order and shells. What that leaves unverified is listed in docs/container.md.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from apt_packages import apt_install
from conftest import put_in_hub_cache, tiny_lm_config
from slurm_cluster import loss_records, outside_slurm, wait_for

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "container"))
import defrun  # noqa: E402  (container/ is a folder of scripts, not a package)

DEF = defrun.parse((REPO / "apptainer.def").read_text())
CONTAINERFILE = (REPO / "Containerfile").read_text()
BASE_TAG = "localhost/debian:bookworm-slim"
CONTAINERS_CONF = REPO / "container" / "containers.conf"
# What a build host without Docker Hub needs (base-image.sh debootstraps the base; containers.conf picks runc).
BUILD_HOST_TOOLS = ("podman", "runc", "debootstrap")


# ---- Containerfile parsing (just the instructions these recipes use) ----

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def final_stage(text: str) -> list[tuple[str, str]]:
    steps = instructions(text)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def key_values(arguments: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arguments))


def containerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in final_stage(CONTAINERFILE):
        if op == "ENV":
            env.update(key_values(args))
    return env


def containerfile_args() -> dict[str, str | None]:
    args: dict[str, str | None] = {}
    for op, value in instructions(CONTAINERFILE):
        if op == "ARG":
            name, sep, default = value.partition("=")
            args[name] = default if sep else args.get(name)
    return args


def containerfile_copies() -> set[tuple[str, str]]:
    pairs = set()
    for op, args in final_stage(CONTAINERFILE):
        if op == "COPY":
            *sources, dest = shlex.split(args)
            for src in sources:
                pairs.add((src, dest + Path(src).name if dest.endswith("/") else dest))
    return pairs


def def_environment(base_path: str) -> dict[str, str]:
    """What %environment exports, evaluated by /bin/sh the way Apptainer sources it."""
    script = DEF["sections"]["environment"]
    out = subprocess.run(["env", "-i", f"PATH={base_path}", "/bin/sh", "-c", f"{script}\nenv -0"],
                         capture_output=True, text=True, check=True).stdout
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_")}


def install_calls(script: str) -> list[tuple[str, set[str]]]:
    """Each `install.sh PHASE` call with the SFT_* variables set for it (inline or exported before)."""
    calls, exported = [], set()
    for line in re.sub(r"\\\n\s*", " ", script).splitlines():
        names = set(re.findall(r"\b(SFT_\w+)=", line))
        if line.strip().startswith("export "):
            exported |= names
        match = re.search(r"container/install\.sh (\w+)", line)
        if match:
            calls.append((match.group(1), names | exported))
    return calls


# ---- recipe checks: fast, no container tools ----

def test_def_lints_clean():
    header, sections = DEF["header"], DEF["sections"]
    assert list(header)[0] == "bootstrap" and header["bootstrap"] == "docker"
    assert set(header) <= defrun.HEADER_KEYS
    assert set(sections) <= defrun.SECTIONS, set(sections) - defrun.SECTIONS
    for name in ("arguments", "files", "post", "environment", "runscript", "test", "labels", "help"):
        assert sections.get(name, "").strip(), f"apptainer.def: %{name} is empty"
    # Every template variable has a default, so a plain `apptainer build sft.sif apptainer.def` works.
    rendered = defrun.render((REPO / "apptainer.def").read_text(), {})
    assert "{{" not in rendered
    for src, dst in defrun.files(sections["files"]):
        assert (REPO / src).exists(), f"%files: {src} does not exist"
        assert dst.startswith("/opt/sft/"), f"%files: {dst} lies outside /opt/sft"
    # The scriptlets are /bin/sh scripts (Apptainer runs them with /bin/sh -ex); a syntax error fails here.
    for name in ("setup", "post", "environment", "runscript", "test"):
        subprocess.run(["/bin/sh", "-n", "-c", defrun.parse(rendered)["sections"][name]], check=True)
    for path in ("/data", "/outputs", "/cache", "/secrets/.env", "--nv"):
        assert path in sections["help"], f"%help does not explain {path}"


def test_both_recipes_copy_the_same_files():
    assert containerfile_copies() == set(defrun.files(DEF["sections"]["files"]))


def test_both_recipes_set_the_same_environment():
    base_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = containerfile_env()
    assert def_environment(base_path) == {k: v.replace("$PATH", base_path) for k, v in env.items()}
    assert env["PYTHONNOUSERSITE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/cache/"), "HF_HOME must point at the bound cache, not into the image"
    # Triton and torch.compile write kernels at run time; the image itself is read-only.
    assert env["TRITON_CACHE_DIR"].startswith("/cache/") and env["TORCHINDUCTOR_CACHE_DIR"].startswith("/cache/")
    assert env["SFT_PROVENANCE_FILE"] == "/opt/sft/provenance.json"


def test_both_recipes_run_the_same_entrypoint():
    entrypoint = [json.loads(args) for op, args in final_stage(CONTAINERFILE) if op == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    runscript = [l.strip() for l in DEF["sections"]["runscript"].splitlines() if l.strip()]
    assert runscript == ["exec " + " ".join(entrypoint[0]) + ' "$@"']
    # No CMD: `podman run IMAGE` and `apptainer run IMAGE` both call sft with no arguments.
    assert not [op for op, _ in final_stage(CONTAINERFILE) if op == "CMD"]
    assert (REPO / "entrypoint.py").read_text().count("main()") == 1


def test_both_recipes_run_the_same_build_steps():
    oci_calls = [call for op, args in final_stage(CONTAINERFILE) if op == "RUN" for call in install_calls(args)]
    def_calls = install_calls(DEF["sections"]["post"])
    assert [phase for phase, _ in oci_calls] == [phase for phase, _ in def_calls] == ["deps", "app"]
    for (phase, oci_vars), (_, def_vars) in zip(oci_calls, def_calls):
        # The def computes what the Containerfile needs build args for (version, lock hash, date), so it
        # passes a subset; everything it passes, the Containerfile passes too.
        assert def_vars <= oci_vars, (phase, def_vars - oci_vars)
        assert "SFT_PIP_ARGS" in def_vars
    defaults = defrun.arguments(DEF["sections"]["arguments"])
    args = containerfile_args()
    assert {name: args.get(name) for name in defaults} == defaults


def test_both_recipes_carry_the_same_labels():
    oci = {}
    for op, args in final_stage(CONTAINERFILE):
        if op == "LABEL":
            oci.update(key_values(args))
    static = defrun.labels(DEF["sections"]["labels"])
    # The def writes the build-dependent labels from %post (container/install.sh), like `apptainer inspect` shows.
    dynamic = set(re.findall(r'"((?:org\.opencontainers|sft)\.[\w.-]+)":', (REPO / "container/install.sh").read_text()))
    assert set(oci) == set(static) | dynamic
    assert {k: oci[k] for k in static} == static
    assert {"org.opencontainers.image.revision", "org.opencontainers.image.version", "sft.lock-sha256",
            "org.opencontainers.image.created"} <= dynamic


def test_make_passes_only_build_args_the_recipes_define():
    # Apptainer refuses unused --build-arg names; a stale Makefile would break `make build` on every cluster.
    def build_args(target: str) -> set[str]:
        out = subprocess.run(["make", "-n", target, "APPTAINER=apptainer", "OCI_TOOL=podman"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return set(re.findall(r"--build-arg (\w+)=", out))

    assert build_args("build") == set(defrun.arguments(DEF["sections"]["arguments"]))
    assert build_args("oci") <= set(containerfile_args())


def test_context_holds_exactly_what_the_recipes_copy():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src for src, _ in defrun.files(DEF["sections"]["files"])}
    assert allowed == copied, "keep .dockerignore's allow-list equal to what the recipes copy"


def test_container_md_names_what_a_build_host_without_docker_hub_needs():
    docs = " ".join((REPO / "docs" / "container.md").read_text().split())
    assert f"apt-get install {' '.join(BUILD_HOST_TOOLS)}" in docs
    assert "--find-links /srv/wheels --index-url" in docs  # torch from a wheel folder, the rest from the index


def test_makefile_build_context_is_what_the_recipes_copy():
    make = subprocess.run(["make", "-s", "--eval", "show-context: ; @echo $(BUILD_CONTEXT)", "show-context"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
    assert set(make) == {src for src, _ in defrun.files(DEF["sections"]["files"])}


def test_provenance_is_dirty_when_untracked_files_would_enter_the_image(tmp_path):
    """An untracked configs/*.yaml goes into the image (the context copies configs/), so the commit alone does not
    describe it; an untracked file outside the context (notes, runs/) changes nothing built."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("task: classification\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("outside the build context\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "configs" / "mine.yaml").write_text("task: causal_lm\n")
    assert git_commit(tmp_path) == head + "-dirty"
    (tmp_path / "configs" / "mine.yaml").unlink()
    (tmp_path / "configs" / "demo.yaml").write_text("task: causal_lm\n")  # a changed tracked file, as before
    assert git_commit(tmp_path) == head + "-dirty"


def test_image_locks_only_add_pinned_packages():
    def pins(path: Path) -> dict[str, str]:
        lines = [l for l in path.read_text().splitlines() if l and not l.startswith("#")]
        assert all("==" in l for l in lines), f"{path.name}: every line must pin an exact version"
        return {re.sub(r"[-_.]+", "-", l.split("==")[0]).lower(): l.split("==")[1] for l in lines}

    base, jupyter, cuda = (pins(REPO / path) for path in ("requirements.lock", "container/jupyter.lock",
                                                          "container/cuda.lock"))
    assert "jupyterlab" in jupyter
    # What PyPI's CUDA torch pulls in: Triton (flex_attention, torch.compile) and NCCL (multi-GPU) among them.
    assert {"triton", "nvidia-cuda-runtime"} <= set(cuda) and any(name.startswith("nvidia-nccl") for name in cuda)
    assert not set(jupyter) & set(base) and not set(cuda) & (set(base) | set(jupyter)), "a package pinned twice"


def test_defrun_templating_fails_like_apptainer():
    text = "Bootstrap: docker\nFrom: {{ BASE }}\n%arguments\n    BASE=debian:12\n%post\n    echo {{ X }}\n"
    with pytest.raises(ValueError, match="without a value"):
        defrun.render(text, {})
    with pytest.raises(ValueError, match="not used"):
        defrun.render(text, {"X": "1", "TYPO": "2"})
    assert defrun.parse(defrun.render(text, {"X": "1"}))["header"]["from"] == "debian:12"


# ---- real builds (root + podman) ----

def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], cwd=REPO, **kwargs)


@pytest.fixture(scope="session")
def podman_env():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("container builds need root on Linux (rootful podman)")
    missing = [tool for tool in BUILD_HOST_TOOLS if not shutil.which(tool)]
    if missing:
        apt_install(*BUILD_HOST_TOOLS)
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    os.environ["CONTAINERS_CONF"] = str(CONTAINERS_CONF)  # defrun and podman calls below inherit it
    sh("container/base-image.sh", env=env)
    return env


def host_pip_sources() -> tuple[list[str], list[str]]:
    """This machine's pip indexes/wheel folders as pip options, and the local folders they need mounted.
    Why: here torch==2.13.0 resolves to a CPU wheel on local disk; on a normal host the same lock gets PyPI's CUDA build."""
    out = sh(REPO / ".venv/bin/python", "-m", "pip", "config", "list", capture_output=True, text=True).stdout
    config: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        config.setdefault(key.split(".")[-1], []).extend(value.strip("'\"").split())
    options, folders = [], []
    for name in ("index-url", "extra-index-url", "find-links"):
        for value in dict.fromkeys(config.get(name, [])):
            options += [f"--{name}", value]
            path = value.removeprefix("file://")
            if path.startswith("/"):
                folders.append(str(Path(path).parent if path.rstrip("/").endswith("/simple") else path))
    return options, sorted(set(folders))


def git_commit(folder: Path = REPO) -> str:
    """The GIT_COMMIT that make passes to the builds, by the Makefile's own rule."""
    return subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "--eval", "show-commit: ; @echo $(GIT_COMMIT)",
                           "show-commit"], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def build_options() -> dict[str, str]:
    options, folders = host_pip_sources()
    ca = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    return {"BASE_IMAGE": BASE_TAG, "SFT_PIP_ARGS": shlex.join(["--progress-bar=off", *options]),
            "PIP_CA_BUNDLE": str(ca) if ca.is_file() else "",
            "mounts": " ".join(f"--volume {f}:{f}:ro" for f in folders)}


@pytest.fixture(scope="session")
def def_build(podman_env, tmp_path_factory):
    """Starts building apptainer.def with the stand-in, in the background, with exactly the build args and binds
    `make build` would pass. Background because it overlaps the OCI build: 2 cores, two mostly single-threaded
    pip installs, about 1.5 minutes saved when nothing is cached."""
    tag, options = "localhost/sft-def:test", build_options()
    commit = git_commit()
    out = sh("make", "-n", "build", "APPTAINER=apptainer", "TORCH_VARIANT=cpu", f"BASE_IMAGE={options['BASE_IMAGE']}",
             f"SFT_PIP_ARGS={options['SFT_PIP_ARGS']}", f"PIP_CA_BUNDLE={options['PIP_CA_BUNDLE']}",
             capture_output=True, text=True).stdout
    words = shlex.split(re.sub(r"\\\n", " ", out.split("apptainer build", 1)[1].split("sha256sum")[0]))
    build_args = [words[i + 1] for i, w in enumerate(words) if w == "--build-arg"]
    binds = [words[i + 1] for i, w in enumerate(words) if w == "--bind"]
    binds += [m.split(" ", 1)[1] for m in re.findall(r"--volume \S+", options["mounts"])]
    # No layer cache in the stand-in (GIT_COMMIT is in %post: every commit rebuilds it anyway); dropping the
    # previous image first keeps repeated runs from piling up multi-GB images.
    sh("podman", "rmi", "--ignore", tag, stdout=subprocess.DEVNULL)
    cmd = [sys.executable, "container/defrun.py", "build", "apptainer.def", "--tag", tag]
    cmd += [f"--build-arg={a}" for a in build_args] + [f"--bind={b}" for b in binds]
    log = tmp_path_factory.mktemp("defrun") / "build.log"
    with log.open("w") as out_file:
        process = subprocess.Popen(cmd, cwd=REPO, env=podman_env, stdout=out_file, stderr=subprocess.STDOUT)
    yield tag, commit, process, log
    if process.poll() is None:  # an aborted session must not leave a build running
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def def_image(def_build):
    tag, commit, process, log = def_build
    if process.wait() != 0:
        pytest.fail("building apptainer.def with container/defrun.py failed:\n" + log.read_text()[-6000:])
    return tag, commit


@pytest.fixture(scope="session")
def oci_image(podman_env, def_build):
    """`make oci` for real, with this machine's package sources (def_build runs alongside); returns the tag.
    TORCH_VARIANT=cpu: the CUDA image (make's default) is a multi-GB one-off, measured in docs/container.md."""
    tag, options = "localhost/sft:test", build_options()
    commit = git_commit()  # now, not after the build: others may commit to this tree meanwhile
    sh("make", "oci", f"IMAGE={tag}", "TORCH_VARIANT=cpu", f"BASE_IMAGE={options['BASE_IMAGE']}",
       f"SFT_PIP_ARGS={options['SFT_PIP_ARGS']}",
       f"PIP_CA_BUNDLE={options['PIP_CA_BUNDLE']}", f"OCI_BUILD_FLAGS={options['mounts']}", env=podman_env)
    return tag, commit


def provenance(tag: str) -> dict:
    out = sh("podman", "run", "--rm", "--entrypoint", "cat", tag, "/opt/sft/provenance.json",
             capture_output=True, text=True).stdout
    return json.loads(out)


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder with its content hash: what 'nothing else changed' is checked against."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bound_dirs(tmp_path):
    """The bind contract's host side: data + .env (read-only), outputs + cache (read-write, owned by the user)."""
    dirs = {name: tmp_path / name for name in ("data", "secrets", "outputs", "cache")}
    for folder in dirs.values():
        folder.mkdir()
    shutil.copytree(REPO / "data" / "demo", dirs["data"] / "demo")
    (dirs["secrets"] / ".env").write_text("DATA_PATH=/data/demo/reviews.jsonl\n")
    for name in ("outputs", "cache"):
        os.chown(dirs[name], 1000, 1000)
    return dirs


def bind_flags(dirs: dict[str, Path]) -> list[str]:
    return ["--user", "1000:1000", "--network", "none",
            "--volume", f"{dirs['data']}:/data:ro", "--volume", f"{dirs['secrets']}/.env:/secrets/.env:ro",
            "--volume", f"{dirs['outputs']}:/outputs", "--volume", f"{dirs['cache']}:/cache"]


# The demo through the bind contract: data path from the bound .env, run directory into /outputs, 2 steps.
TRAIN_ARGS = ["train", "--env-file", "/secrets/.env", "configs/demo.yaml", "data.train=${DATA_PATH}",
              "output.dir=/outputs", "output.name=ctest", "training.max_steps=2"]


def assert_run_recorded(dirs: dict[str, Path], image: dict, before: dict[str, dict]):
    manifest = json.loads((dirs["outputs"] / "ctest" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["image"] == image, "manifest.json must copy the image's provenance"
    # Nothing but outputs and cache changed; everything written belongs to the calling user.
    assert tree(dirs["data"]) == before["data"] and tree(dirs["secrets"]) == before["secrets"]
    owners = {p.stat().st_uid for p in (dirs["outputs"] / "ctest").rglob("*")}
    assert owners == {1000}


@pytest.mark.container
def test_oci_image_labels_archive_and_size(oci_image):
    oci_image, commit = oci_image
    image = provenance(oci_image)
    lock = hashlib.sha256((REPO / "requirements.lock").read_bytes()).hexdigest()
    assert image["git_commit"] == commit and image["lock_sha256"] == lock and image["builder"] == "oci"
    labels = json.loads(sh("podman", "image", "inspect", oci_image, capture_output=True, text=True).stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.revision"] == image["git_commit"]
    assert labels["org.opencontainers.image.version"] == image["version"]
    assert labels["org.opencontainers.image.created"] == image["build_date"]
    assert labels["sft.lock-sha256"] == lock
    with tarfile.open(REPO / "build" / "sft-oci.tar") as archive:
        names = set(archive.getnames())
    assert {"index.json", "oci-layout"} <= names, "make oci must leave an oci-archive for make sif-from-oci"
    size = int(sh("podman", "image", "inspect", "--format", "{{.Size}}", oci_image,
                  capture_output=True, text=True).stdout)
    assert size < 6e9, f"image is {size / 1e9:.1f} GB (target: <= 6 GB with CUDA; this CPU build is smaller)"
    documented = float(re.search(r"The CPU image the suite builds is ([\d.]+) GB",
                                 " ".join((REPO / "docs" / "container.md").read_text().split()))[1])
    assert size == pytest.approx(documented * 1e9, rel=0.05), f"docs/container.md says {documented} GB, built {size}"


@pytest.mark.container
def test_oci_image_runs_the_demo_under_the_bind_contract(oci_image, bound_dirs):
    oci_image, _ = oci_image
    before = {name: tree(bound_dirs[name]) for name in ("data", "secrets")}
    base = ["podman", "run", "--read-only", *bind_flags(bound_dirs), "--workdir", "/opt/sft"]
    info = sh(*base, "--rm", "--env", "COLUMNS=200", oci_image, "info", capture_output=True, text=True).stdout
    image = provenance(oci_image)
    assert "image git_commit" in info and image["git_commit"] in info, info

    def root_changes(*command: str) -> str:
        """`podman diff` of a finished container: every path added/changed/deleted in its root file system."""
        name = "sft-ctest-run"
        sh("podman", "rm", "--force", "--ignore", name, stdout=subprocess.DEVNULL)
        sh(*base, "--name", name, *command)
        try:
            return sh("podman", "diff", name, capture_output=True, text=True).stdout
        finally:
            sh("podman", "rm", "--force", name, stdout=subprocess.DEVNULL)

    # The root file system changes no more than podman's own mount points do (/etc/hosts, bind targets).
    assert root_changes(oci_image, *TRAIN_ARGS) == root_changes("--entrypoint", "true", oci_image)
    assert_run_recorded(bound_dirs, image, before)
    # torch.compile (what Triton does on a GPU, Inductor's C++ backend here) compiles into the bound /cache.
    compile_check = "import torch; x = torch.ones(8); assert torch.compile(lambda x: x.sin() + 1)(x).equal(x.sin() + 1)"
    sh(*base, "--rm", "--entrypoint", "python", oci_image, "-c", compile_check)
    assert list((bound_dirs["cache"] / "torchinductor").rglob("*.so")), "no compiled kernel in the bound cache"


@pytest.mark.container
def test_apptainer_def_builds_tests_and_runs(def_image, bound_dirs):
    def_image, commit = def_image
    image = provenance(def_image)
    assert image["git_commit"] == commit and image["builder"] == "apptainer"
    labels = defrun.inspect_labels(def_image)
    assert labels["org.opencontainers.image.revision"] == image["git_commit"]
    assert labels["sft.lock-sha256"] == image["lock_sha256"]
    assert labels["org.opencontainers.image.title"] == "sft"
    # %test (imports, sft info, a 2-step fine-tune) on a read-only root as a normal user, as `apptainer test`.
    sh(*defrun.run_args(def_image, "/.singularity.d/test", [], ["--user", "1000:1000", "--network", "none"]))
    # %runscript through %environment, with the bind contract, as `apptainer run`.
    before = {name: tree(bound_dirs[name]) for name in ("data", "secrets")}
    flags = [*bind_flags(bound_dirs), "--workdir", "/opt/sft"]
    sh(*defrun.run_args(def_image, "/.singularity.d/runscript", TRAIN_ARGS, flags))
    assert_run_recorded(bound_dirs, image, before)


@pytest.mark.container
@pytest.mark.slurm
def test_train_sbatch_runs_the_oci_image_with_podman_and_resumes_after_usr1(oci_image, slurm_cluster, tmp_path,
                                                                             tiny_causal_lm, tiny_chat_data):
    """docs/cluster.md's podman path: `sft check` and `sft prepare` from the venv in the project directory, then
    SFT_RUNTIME=podman: train.sbatch runs the image the suite built with the default binds (./data, ./runs,
    ./.cache) and trains on the tokenized data the venv prepared; USR1 reaches sft through podman, which checkpoints
    and exits 75, the job requeues and the second start resumes in a new container; the image's provenance (only
    inside the image) is in the manifest; `sft clean` from the venv removes the run's checkpoints and tokenized
    data. A GPU job asks podman for the CDI devices; a CPU job (--gres=none) asks for none."""
    tag, _ = oci_image
    project = tmp_path / "project"
    for folder in ("configs", "data", "logs"):
        (project / folder).mkdir(parents=True)
    # A hub model where `sft fetch` puts it (./.cache/huggingface), as docs/cluster.md's step 2 leaves it.
    put_in_hub_cache(tiny_causal_lm, project / ".cache" / "huggingface" / "hub")
    shutil.copy(tiny_chat_data, project / "data" / "chat.jsonl")
    config = tiny_lm_config(Path("org/tiny"), Path("data/chat.jsonl"), Path("ignored"), max_steps=600)
    (project / "configs" / "tiny.yaml").write_text(json.dumps(config))
    before = {name: digest for name, digest in tree(project).items() if not name.startswith(".cache/")}
    env = {**outside_slurm(), "SLURM_CONF": str(slurm_cluster.conf), "CONTAINERS_CONF": str(CONTAINERS_CONF),
           "SFT_RUNTIME": "podman", "SFT_IMAGE": tag, "OMP_NUM_THREADS": "1"}
    script = str(REPO / "slurm" / "train.sbatch")

    def sft(*args):
        login = {name: value for name, value in outside_slurm().items() if name not in ("HF_HOME", "HF_HUB_CACHE")}
        login |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                  "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(["sft", *args], cwd=project, env=login, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    sft("check", "configs/tiny.yaml")
    sft("prepare", "configs/tiny.yaml")
    tokenized_dir = project / ".cache" / "huggingface" / "sft" / "tokenized"
    [tokenized] = [entry for entry in tokenized_dir.iterdir() if entry.is_dir()]
    job = slurm_cluster.sbatch("--cpus-per-task=1", "--gres=none", script, "configs/tiny.yaml", "output.name=podman",
                               env=env, cwd=project)
    run_dir = project / "runs" / "podman"
    wait_for(lambda: len(loss_records(run_dir)) >= 10, f"job {job} logging 10 steps", slurm_cluster, timeout=180)
    slurm_cluster.signal_batch(job, "USR1")
    wait_for(lambda: slurm_cluster.job(job)["Restarts"] == "1", f"job {job} requeued", slurm_cluster)
    slurm_cluster.wait(job, timeout=240)
    log = (project / "logs" / f"sft-{job}.out").read_text()
    assert log.count("runtime: podman version") == 2 and f"image {tag}, " in log, log
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["image"] == provenance(tag)
    [restart] = manifest["restarts"]
    assert restart["slurm_job"] == job and 10 <= restart["resumed_from_step"] < 600
    assert [r["step"] for r in loss_records(run_dir)] == list(range(1, 601))
    # The project directory is read-only in the container: only the log, the run and the cache are new.
    assert {name: digest for name, digest in tree(project).items()
            if not name.startswith(("logs/", "runs/", ".cache/"))} == before
    assert manifest["data"]["cache_key"] == tokenized.name  # the job trained on what the venv prepared,
    assert f"tokenized data from cache {tokenized.name}" in log  # without tokenizing it again
    assert "tokenized data cache" in sft("clean", "runs/podman") and not tokenized.exists()

    gpu_job = slurm_cluster.sbatch("--cpus-per-task=1", "--gres=gpu:1", script, "configs/tiny.yaml",
                                   "output.name=podman-gpu", env=env, cwd=project)
    slurm_cluster.wait(gpu_job, states=("FAILED",))
    # The fake GPUs have no CDI specification: podman itself refuses the device it was asked for.
    assert "nvidia.com/gpu=all" in (project / "logs" / f"sft-{gpu_job}.out").read_text()
    assert not (project / "runs" / "podman-gpu").exists()
