"""Stand-in for `apptainer build` / `run` / `test` where Apptainer cannot be installed: replays apptainer.def with podman.

    python container/defrun.py build apptainer.def --tag localhost/sft-def [--build-arg K=V] [--bind SRC:DST[:ro]]
    python container/defrun.py run localhost/sft-def info        # like `apptainer run IMAGE info`
    python container/defrun.py test localhost/sft-def            # like `apptainer test IMAGE`

It follows Apptainer 1.x (pkg/build/types/parser/deffile.go, internal/pkg/build/stage.go and files/copy.go):
sections split on lines starting with `%`; `{{ NAME }}` filled from %arguments and --build-arg (undefined or
unused names are errors, as in Apptainer); %setup on the host with /bin/sh -ex and $APPTAINER_ROOTFS; %files
copied with `cp -fLr` after creating the destination's parent; %post inside the image with /bin/sh -ex, a clean
environment, $APPTAINER_ENVIRONMENT and $APPTAINER_LABELS; then %environment, %runscript, %test and %help into
/.singularity.d; `run`/`test` source /.singularity.d/env/*.sh and execute the script on a read-only root.
What only a real Apptainer shows: SIF/squashfs packing, --fakeroot, --nv, its default binds ($HOME, $PWD, /tmp)
and a %setup that sees the base image's files (here it sees only what the def itself adds).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SECTIONS = {"help", "setup", "files", "labels", "environment", "pre", "post", "runscript", "test", "startscript",
            "arguments"}
HEADER_KEYS = {"bootstrap", "from", "stage", "fingerprints"}
TEMPLATE = re.compile(r"{{\s*(\w+)\s*}}")
ENV_DIR = "/.singularity.d/env"


def parse(text: str) -> dict:
    """Header keys and section bodies. Repeated sections are appended, like Apptainer does."""
    header: dict[str, str] = {}
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            current = words[0][1:].lower()
            sections.setdefault(current, "")
            continue
        if current is None:
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                key, sep, value = stripped.split("#")[0].partition(":")
                if not sep:
                    raise ValueError(f"header line without 'key: value': {line!r}")
                header[key.strip().lower()] = value.strip()
        else:
            sections[current] += line + "\n"
    return {"header": header, "sections": sections}


def entries(section: str) -> list[str]:
    """A section's stripped lines, without blanks and comments (%arguments, %files and %labels read alike)."""
    return [line.strip() for line in section.splitlines() if line.strip() and not line.strip().startswith("#")]


def arguments(section: str) -> dict[str, str]:
    return {name.strip(): value.strip() for name, _, value in (line.partition("=") for line in entries(section))}


def render(text: str, build_args: dict[str, str]) -> str:
    """Fill {{ NAME }} like `apptainer build --build-arg`: values from --build-arg, else %arguments; a name without
    a value, or a --build-arg the text never uses, is an error (Apptainer's default, without --warn-unused-build-args)."""
    defaults = arguments(parse(text)["sections"].get("arguments", ""))
    used = set(TEMPLATE.findall(text))
    unused = set(build_args) - used
    if unused:
        raise ValueError(f"build args not used by the definition: {sorted(unused)}")
    values = {**defaults, **build_args}
    missing = sorted(used - set(values))
    if missing:
        raise ValueError(f"template variables without a value: {missing}")
    return TEMPLATE.sub(lambda m: values[m.group(1)], text)


def files(section: str) -> list[tuple[str, str]]:
    pairs = []
    for line in entries(section):
        src, *dst = line.split()
        pairs.append((src, dst[0] if dst else src))
    return pairs


def labels(section: str) -> dict[str, str]:
    return {key: value.strip() for key, _, value in (line.partition(" ") for line in entries(section))}


def podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], check=True, **kwargs)


def build(def_path: Path, tag: str, build_args: dict[str, str], binds: list[str], context: Path) -> None:
    definition = parse(render(def_path.read_text(), build_args))
    header, sections = definition["header"], definition["sections"]
    if header.get("bootstrap") != "docker":
        raise ValueError("only `Bootstrap: docker` is replayed")
    with tempfile.TemporaryDirectory(prefix="sft-defrun.") as tmp:
        stage = Path(tmp)
        rootfs = stage / "rootfs"
        (rootfs / ENV_DIR.lstrip("/")).mkdir(parents=True)
        if sections.get("setup", "").strip():
            script = stage / "setup.sh"
            script.write_text(sections["setup"])
            env = {**os.environ, "APPTAINER_ROOTFS": str(rootfs), "SINGULARITY_ROOTFS": str(rootfs)}
            subprocess.run(["/bin/sh", "-ex", str(script)], check=True, env=env, cwd=context)
        for src, dst in files(sections.get("files", "")):
            target = rootfs / dst.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-fLr", src, str(target)], check=True, cwd=context)
        (stage / "post.script").write_text(sections.get("post", ""))
        meta = stage / "meta"
        (meta / "env").mkdir(parents=True)
        (meta / "env" / "90-environment.sh").write_text(
            "#!/bin/sh\n# Custom environment shell code should follow\n\n" + sections.get("environment", ""))
        (meta / "runscript").write_text("#!/bin/sh\n\n" + sections.get("runscript", ""))
        (meta / "test").write_text("#!/bin/sh\n\n" + sections.get("test", ""))
        (meta / "runscript.help").write_text(sections.get("help", ""))
        (meta / "labels.json").write_text(json.dumps(labels(sections.get("labels", "")), indent=2))
        for script in ("runscript", "test"):
            (meta / script).chmod(0o755)
        (stage / "Containerfile").write_text("\n".join([
            f"FROM {header['from']}",
            "COPY rootfs/ /",
            "COPY post.script /.post.script",
            # Apptainer: exec --cleanenv --writable --pwd / IMAGE /bin/sh -ex /.post.script
            "RUN cd / && env -i PATH=\"$PATH\" HOME=/root LANG=C "
            f"APPTAINER_ENVIRONMENT={ENV_DIR}/91-environment.sh SINGULARITY_ENVIRONMENT={ENV_DIR}/91-environment.sh "
            "APPTAINER_LABELS=/.build.labels SINGULARITY_LABELS=/.build.labels "
            "/bin/sh -ex /.post.script && rm /.post.script",
            "COPY meta/ /.singularity.d/",
            "",
        ]))
        # No layer cache: Apptainer has none either, and each commit (GIT_COMMIT is in %post) would otherwise
        # leave a multi-GB intermediate image behind.
        command = ["build", "--layers=false", "--tag", tag, "--file", str(stage / "Containerfile")]
        for bind in binds:
            command += ["--volume", bind]
        podman(*command, str(stage))


def inspect_labels(tag: str) -> dict[str, str]:
    """Labels as `apptainer inspect` shows them: %labels plus those %post wrote to $APPTAINER_LABELS."""
    out = podman("run", "--rm", "--entrypoint", "/bin/sh", tag, "-c",
                 "cat /.singularity.d/labels.json; echo; echo ---; cat /.build.labels 2>/dev/null || true",
                 capture_output=True, text=True).stdout
    static, _, dynamic = out.partition("\n---\n")
    return {**json.loads(static), **labels(dynamic)}


def run_args(tag: str, script: str, args: list[str], podman_args: list[str] = ()) -> list[str]:
    """`apptainer run`/`test` as a podman command line: a read-only root (as a SIF is), the image's env scripts
    sourced in order, then the runscript or test script executed with the arguments."""
    loader = f'for f in {ENV_DIR}/*.sh; do [ -r "$f" ] && . "$f"; done; exec /bin/sh {script} "$@"'
    return ["podman", "run", "--rm", "--read-only", *podman_args, "--entrypoint", "/bin/sh", tag,
            "-c", loader, "sh", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build")
    b.add_argument("definition", type=Path)
    b.add_argument("--tag", required=True)
    b.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    b.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]")
    for name in ("run", "test"):
        c = commands.add_parser(name)
        c.add_argument("tag")
        c.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "build":
        build_args = dict(item.split("=", 1) for item in args.build_arg)
        build(args.definition, args.tag, build_args, args.bind, Path.cwd())
        return 0
    script = "/.singularity.d/runscript" if args.command == "run" else "/.singularity.d/test"
    return subprocess.run(run_args(args.tag, script, args.args)).returncode


if __name__ == "__main__":
    sys.exit(main())
