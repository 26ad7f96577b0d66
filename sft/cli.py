"""Command line: parse, dispatch, and turn user errors into one line + exit code 2 (tracebacks only with --debug).

    sft train CONFIG [key.sub=value ...]   fine-tune (a bare `sft CONFIG` means the same)
    sft check CONFIG [key.sub=value ...]   validate the config and every data row, no weights loaded
    sft prepare CONFIG [key.sub=value ...] validate and tokenize into the cache (CPU only, e.g. before the GPU job)
    sft info                               versions, GPUs and container provenance
"""
import argparse
import os
import sys

from sft.errors import EXIT_USER_ERROR, UserError

COMMANDS = ("train", "check", "prepare", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft", description="Supervised fine-tuning for HPC clusters.",
                                     epilog="A bare `sft CONFIG` runs `sft train CONFIG`.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
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
                                           help="replace a finished run directory of the same name")
    commands.choices["check"].add_argument("--gpu-mem", metavar="SIZE",
                                           help="GPU memory to check the run's estimated peak against, e.g. 80GB "
                                                "(default: the visible GPU)")
    commands.add_parser("info", help="show versions, GPUs and container provenance").add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


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

    from sft.logs import setup_terminal

    setup_terminal(args.debug)
    try:
        return {"train": _train, "check": _check, "prepare": _prepare, "info": _info}[args.command](args)
    except UserError as error:
        if args.debug:
            raise
        from sft.secrets import mask

        print(f"sft: error: {mask(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:
        # Set once the run directory exists (sft.training.Interrupted); before that there is nothing to resume.
        resume = getattr(stop, "resume_command", None)
        print(f"sft: interrupted; resume from the newest complete checkpoint with: {resume}" if resume
              else "sft: interrupted before the run started", file=sys.stderr)
        return 130


def _train(args) -> int:
    from sft.config import load_config
    from sft.report import print_summary
    from sft.training import Preempted, run_training

    config = load_config(args.config, args.overrides, args.env_file)
    try:
        result = run_training(config, overwrite=args.overwrite, overrides=args.overrides, env_file=args.env_file)
    except Preempted as stop:
        if stop.resume_command:  # printed, not logged: the log wraps long lines, and this one gets copied
            print(f"sft: preempted; a requeued job resumes by itself, or resume with: {stop.resume_command}",
                  file=sys.stderr)
        return stop.exit_code
    if result.is_main_process:
        print_summary(result)
    return 0


def _check(args) -> int:
    import tempfile
    from pathlib import Path

    from sft.config import load_config
    from sft.data import load_rows
    from sft.estimate import parse_memory, print_preflight, visible_gpu_memory
    from sft.report import print_check

    config = load_config(args.config, args.overrides, args.env_file)
    gpu_bytes = parse_memory(args.gpu_mem) if args.gpu_mem else visible_gpu_memory()
    with tempfile.TemporaryDirectory(prefix="sft-check-") as work_dir:
        print_check(config, load_rows(config, Path(work_dir)))
    print_preflight(config, gpu_bytes)
    return 0


def _prepare(args) -> int:
    """Tokenize into the cache with the tokenizer only (no weights, no GPU), e.g. on a CPU node before the GPU job."""
    from sft.config import load_config
    from sft.data import prepare
    from sft.model import load_tokenizer
    from sft.report import print_prepare

    config = load_config(args.config, args.overrides, args.env_file)
    print_prepare(config, prepare(config, load_tokenizer(config)))
    return 0


def _info(args) -> int:
    from sft.report import print_info

    print_info()
    return 0

