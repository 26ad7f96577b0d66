"""Command line: parse, dispatch, and turn user errors into one line + exit code 2 (tracebacks only with --debug).

    sft train CONFIG [key.sub=value ...]   fine-tune (a bare `sft CONFIG` means the same)
    sft check CONFIG [key.sub=value ...]   validate config, model files, every data row and output space (no GPU)
    sft prepare CONFIG [key.sub=value ...] validate and tokenize into the cache (CPU only, e.g. before the GPU job)
    sft info                               versions, GPUs and container provenance
    sft predict RUN_DIR INPUT [--output F] a finished run's predictions on new rows, as JSONL
    sft export RUN_DIR [--merge] [--to DIR] a standalone safetensors model + tokenizer
    sft runs [OUTPUT_DIR] [--html FILE]    one line per run: status, steps, best metric, age, Slurm job, endings
    sft clean RUN_DIR [--dry-run]          remove a finished run's checkpoints and data cache
    sft fetch MODEL [--revision R]         download a hub model and its tokenizer into the cache (login node)
    sft report RUN_DIR                     plots and report.md of a run (also written when training finishes)
    sft diff RUN_A RUN_B                   what differs between two runs (inputs, environment, outcome), verdict
    sft reproduce RUN_DIR [--name NEW]     train again from what a run recorded, then diff against it
    sft kernel install [--image sft.sif]   a Jupyter kernel running the image's (or this venv's) Python
"""
import argparse
import os
import sys

from sft import __version__
from sft.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

COMMANDS = ("train", "check", "prepare", "info", "fetch", "predict", "export", "runs", "clean", "report", "diff",
            "reproduce", "kernel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft", description="Supervised fine-tuning for HPC clusters.",
                                     epilog="A bare `sft CONFIG` runs `sft train CONFIG`.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"sft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "fine-tune a model from a YAML config"),
                       ("check", "validate a config and every data row without loading weights"),
                       ("prepare", "validate and tokenize the data into the cache (tokenizer only, no GPU)")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("config", help="YAML config, e.g. configs/sft_v1.yaml")
        command.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
        command.add_argument("--env-file", help=".env file with DATA_PATH, tokens, ... (default: ./.env)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands.choices["train"].add_argument("--overwrite", action="store_true",
                                           help="start over: delete what an earlier run of the same name left, "
                                                "finished or not (a requeue of the same Slurm job still resumes)")
    commands.choices["train"].add_argument("--allow-data-change", action="store_true",
                                           help="resume even though the data's content changed since the run started "
                                                "(recorded in the manifest's restarts)")
    commands.choices["train"].add_argument("--from-checkpoint", metavar="checkpoint-N",
                                           help="restart an unfinished run from this complete checkpoint instead of "
                                                "the newest (e.g. after a nan stop); later checkpoints are moved to "
                                                "RUN/checkpoints.abandoned-TIME/, and training.learning_rate may "
                                                "change")
    commands.choices["check"].add_argument("--gpu-mem", metavar="SIZE",
                                           help="memory of the GPU the run trains on, e.g. 80GB: the settings are "
                                                "checked for a GPU run and the estimated peak against it (default: "
                                                "the visible GPU; without one, a CPU run)")
    commands.add_parser("info", help="show versions, GPUs and container provenance").add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    fetch = commands.add_parser("fetch", help="download a hub model and its tokenizer into the cache (needs network)",
                                description="Download a hub model (safetensors weights, config, tokenizer) into "
                                            "HF_HOME, e.g. on a login node, for the offline runs to find.")
    fetch.add_argument("model", help="hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    fetch.add_argument("--revision", help="branch, tag or commit to pin (as model.revision)")
    fetch.add_argument("--env-file", help=".env file with HF_TOKEN for gated or private models (default: ./.env)")
    fetch.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_tool_commands(commands)
    report = commands.add_parser("report", help="write plots and report.md of a run directory",
                                 description="Write RUN_DIR/plots/*.png and RUN_DIR/report.md from the run's "
                                             "manifest, metrics and evaluation (finished, running or stopped).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/demo-2024-05-01")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_reproducibility_commands(commands)
    return parser


def _add_reproducibility_commands(commands) -> None:
    """diff, reproduce (sft.results.diff, sft.results.reproduce)."""
    diff = commands.add_parser("diff", help="compare two run directories: inputs, environment, outcome, verdict",
                               description="Compare two run directories (finished, failed, preempted or copied from "
                                           "another machine: data hashes decide, not paths). Exit code 0 only when "
                                           "identical.")
    diff.add_argument("run_a", metavar="RUN_A", help="a run directory")
    diff.add_argument("run_b", metavar="RUN_B", help="another run directory")
    reproduce = commands.add_parser("reproduce", help="train again from a run's recorded config, then diff",
                                    description="Train again from RUN_DIR/config.yaml (variables and secrets read "
                                                "again from the environment/.env) after checking every data source "
                                                "still has its recorded hash; then compare with the original.")
    reproduce.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to reproduce")
    reproduce.add_argument("--name", help="name of the new run directory, next to RUN_DIR "
                                          "(default: RUN_DIR's name + -reproduce)")
    reproduce.add_argument("--env-file", help=".env file with DATA_PATH, tokens, ... (default: ./.env)")
    kernel = commands.add_parser("kernel", help="install a Jupyter kernel that runs in the training environment")
    install = kernel.add_subparsers(dest="kernel_command", required=True).add_parser(
        "install", help="write a user kernelspec", description="Write a Jupyter kernelspec whose Python is the "
        "image's (apptainer exec --nv with the binds of the sbatch scripts, from this directory's data/, .env, "
        "runs/, .cache/ or the SFT_* settings) or, without --image, this venv's.")
    install.add_argument("--image", help="container image, e.g. sft.sif")
    install.add_argument("--name", help="kernel name (default: sft, or sft-image with --image)")
    install.add_argument("--display-name", help="name shown in JupyterLab's launcher")
    install.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels instead of the user's "
                                          "Jupyter data directory")
    for command in (diff, reproduce, kernel, install):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


RUN_STATUSES = """statuses:
  running      a live process (or a Slurm job that will run again) owns the directory
  preempted    stopped at a complete checkpoint by a signal or the wall-time guard; a requeued job or
               `sft train` resumes it
  finished     final/ holds the trained model
  failed       ended by an error (manifest.json: error); fix it and rerun to resume
  interrupted  stopped by Ctrl-C; rerun to resume
  killed       its process ended without recording why (time limit, out of memory, node failure); rerun to resume"""


def _add_tool_commands(commands) -> None:
    """predict, export, runs, clean: what to do with run directories (sft.results.predict, sft.results.export,
    sft.run.listing, sft.run.clean)."""
    def add(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=text, description=text, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return command

    predict = add("predict", "predict with a finished run's model: one JSON line per input row (the row plus "
                             "predicted_label and probabilities, or generated text)")
    predict.add_argument("run_dir", help="a finished run directory, e.g. runs/demo-20261125")
    predict.add_argument("input", help="rows to predict: .jsonl, .json, .csv, .parquet or a save_to_disk folder, "
                                       "with the columns the run trained on (labels/answers may be absent)")
    predict.add_argument("--output", help="JSONL file to write (must not exist; default: standard output)")
    predict.add_argument("--batch-size", type=_positive, default=16, help="rows per forward pass (default 16)")
    predict.add_argument("--max-new-tokens", type=_positive, default=128,
                         help="causal LM: most tokens generated per row, greedy (default 128)")
    export = add("export", "write a standalone model folder (safetensors + tokenizer, label names in config.json) "
                           "that from_pretrained loads without sft or peft")
    export.add_argument("run_dir", help="a finished run directory")
    export.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights "
                                                             "(needed for LoRA runs)")
    export.add_argument("--to", help="new or empty folder to write (default: RUN_DIR/export)")
    runs = add("runs", "list run directories: status, steps, best evaluation, age, Slurm job, how each session "
                       "ended (guard: the wall-time guard), longest checkpoint save", epilog=RUN_STATUSES)
    runs.add_argument("output_dir", nargs="?", default="runs", help="a config's output.dir (default: runs)")
    runs.add_argument("--html", metavar="FILE", help="also write a self-contained dashboard page: the runs table, "
                                                     "differing config keys, loss and eval curves, report links")
    clean = add("clean", "remove a finished run's checkpoints and tokenized data cache; keeps final/, config, "
                         "manifest, metrics, logs and report")
    clean.add_argument("run_dir", help="a finished run directory")
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        argv.insert(argv.index(first), "train")
    parser = build_parser()
    # Overrides may follow options (`train c.yaml --env-file F a=1`): argparse leaves those as extras.
    args, extras = parser.parse_known_args(argv)
    if extras and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.overrides += extras
    # Compute nodes rarely reach the internet, and a hub lookup there hangs until a timeout: offline unless
    # the user opts in with HF_HUB_OFFLINE=0 (e.g. on a login node).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from sft.model.hub import use_project_cache

    use_project_cache()

    from sft.logs import setup_terminal

    setup_terminal(args.debug)
    try:
        return {"train": _train, "check": _check, "prepare": _prepare, "info": _info, "fetch": _fetch,
                "predict": _predict, "export": _export, "runs": _runs, "clean": _clean,
                "report": _report, "diff": _diff, "reproduce": _reproduce,
                "kernel": _kernel}[args.command](args)
    except UserError as error:
        if args.debug:
            raise
        from sft.secrets import mask

        # One line whatever the message quotes (a value with a line break, a data line): escape line breaks.
        one_line = mask(str(error)).replace("\r", "\\r").replace("\n", "\\n")
        print(f"sft: error: {one_line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:
        # Set once the run directory exists (sft.training.trainer.Interrupted); before that there is nothing to resume.
        resume = getattr(stop, "resume_command", None)
        if not resume:
            print("sft: interrupted before the run started", file=sys.stderr)
        elif stop.has_checkpoint:
            print(f"sft: interrupted; resume from the newest complete checkpoint with: {resume}", file=sys.stderr)
        else:
            print(f"sft: interrupted before the first checkpoint; start the run again with: {resume}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args) -> int:
    import signal

    from sft.check.preflight import check_settings
    from sft.cli_output import print_summary
    from sft.config import load_config
    from sft.run.directory import RunAlreadyFinished
    from sft.training.trainer import Preempted, run_training

    if args.from_checkpoint and args.overwrite:
        raise UserError("--from-checkpoint restarts a run, --overwrite replaces it; pass one of them")
    config = load_config(args.config, args.overrides, args.env_file)
    check_settings(config)  # before a run directory exists: a bad setting costs a second, not a queue wait
    try:
        result = run_training(config, overwrite=args.overwrite, overrides=args.overrides, env_file=args.env_file,
                              allow_data_change=args.allow_data_change, from_checkpoint=args.from_checkpoint)
    except RunAlreadyFinished as done:
        print(f"sft: {done}", file=sys.stderr)
        return 0
    except Preempted as stop:
        if stop.resume_command:  # printed, not logged: the log wraps long lines, and this one gets copied
            print(f"sft: preempted; a requeued job resumes by itself, or resume with: {stop.resume_command}",
                  file=sys.stderr)
            if os.environ.get("SFT_STOP_FILE"):  # set by slurm/common.sh: torchrun hides this exit code from it
                with open(os.environ["SFT_STOP_FILE"], "w") as stop_file:
                    stop_file.write("stopped for a requeue\n")
        return stop.exit_code
    # Finished: a USR1 now (the time limit's warning, late) must not kill the exiting process with status 138.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if result.is_main_process:
        print_summary(result)
    return 0


def _check(args) -> int:
    import tempfile
    from pathlib import Path

    from sft.check.memory import parse_memory, print_memory_table, visible_gpu_memory
    from sft.check.preflight import run_checks
    from sft.cli_output import print_check
    from sft.config import load_config

    config = load_config(args.config, args.overrides, args.env_file)
    gpu_bytes = parse_memory(args.gpu_mem) if args.gpu_mem else visible_gpu_memory()
    with tempfile.TemporaryDirectory(prefix="sft-check-") as work_dir:
        loaded, lines, model = run_checks(config, Path(work_dir), gpu=gpu_bytes is not None)
    print_check(config, loaded, lines)
    too_big = print_memory_table(config, gpu_bytes, model.config)
    if too_big:  # a failed check, so that a script can act on it before queueing
        where = f"--gpu-mem {args.gpu_mem}" if args.gpu_mem else "the visible GPU"
        raise UserError(f"{where}: {too_big}")
    return 0


def _prepare(args) -> int:
    """Tokenize into the cache with the tokenizer only (no weights, no GPU), e.g. on a CPU node before the GPU job."""
    from sft.cli_output import print_prepare
    from sft.config import load_config
    from sft.data import prepare
    from sft.model.loading import load_tokenizer

    config = load_config(args.config, args.overrides, args.env_file)
    print_prepare(config, prepare(config, lambda: load_tokenizer(config)))
    return 0


def _info(args) -> int:
    from sft.cli_output import print_info

    print_info()
    return 0


def _fetch(args) -> int:
    from sft.config import load_env_file
    from sft.model.hub import fetch

    load_env_file(args.env_file)  # HF_TOKEN (and HF_HOME) as train reads them, before huggingface_hub is imported
    print(f"sft: {args.model} is in the cache: {fetch(args.model, args.revision)}")
    return 0


def _predict(args) -> int:
    from sft.results.predict import predict

    count = predict(args.run_dir, args.input, args.output, args.batch_size, args.max_new_tokens)
    if args.output:
        print(f"sft: wrote {count} predictions to {args.output}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from sft.results.export import export

    print(f"sft: exported to {export(args.run_dir, args.merge, args.to)}")
    return 0


def _runs(args) -> int:
    from datetime import datetime

    from sft.run.listing import format_runs, list_runs

    runs = list_runs(args.output_dir)
    print(format_runs(runs, datetime.now().astimezone()) if runs else f"sft: no runs in {args.output_dir}")
    for run in runs:  # on stderr: the table stays one parseable line per run
        for problem in run.problems:
            print(f"sft: {run.name}: {problem}", file=sys.stderr)
    if args.html:
        from sft.results.dashboard import write_dashboard

        print(f"sft: wrote {write_dashboard(args.output_dir, args.html)}")
    return 0


def _clean(args) -> int:
    from sft.run.clean import clean

    result = clean(args.run_dir, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for what, size in result.removed.items():
        print(f"{verb} {what} ({_size(size)})")
    for note in result.notes:
        print(note)
    print(f"{'would free' if args.dry_run else 'freed'} {_size(result.freed)}; kept {', '.join(result.kept)}")
    return 0


def _size(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _report(args) -> int:
    from sft.run.report import write_report

    print(f"sft: wrote {write_report(args.run_dir)}")
    return 0


def _diff(args) -> int:
    from sft.results.diff import diff

    text, identical = diff(args.run_a, args.run_b)
    print(text)
    return 0 if identical else 1


def _reproduce(args) -> int:
    from sft.results.reproduce import reproduce
    from sft.training.trainer import Preempted

    try:
        text, identical = reproduce(args.run_dir, args.name, args.env_file)
    except Preempted as stop:  # a rerun of the same command finds the unfinished reproduction and resumes it
        import shlex

        words = ["sft", "reproduce", args.run_dir, *(["--name", args.name] if args.name else []),
                 *(["--env-file", args.env_file] if args.env_file else [])]
        print(f"sft: preempted; resume with: {shlex.join(words)}", file=sys.stderr)
        return stop.exit_code
    print(text)
    return 0 if identical else 1


def _kernel(args) -> int:
    import shlex

    from sft.results.kernel import install

    folder, argv = install(args.image, args.name, args.display_name, args.prefix)
    print(f"sft: installed kernel {folder.name} in {folder}: {shlex.join(argv)}")
    return 0
