"""Command line: each subcommand parses its options and makes one library call.

One module per command group (training, inspection, validation, studies); `options` holds the
shared argument helpers, `flags` the table that turns config keys in errors into flags.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from .. import __version__, allocator
from ..errors import LoralabError
from ..redact import mask_secrets
from .flags import flags_of, with_flags
from .inspection import add_analyze, add_merge, cmd_analyze, cmd_merge
from .options import Parser
from .studies import (
    add_ablate,
    add_export,
    add_report,
    add_study,
    add_sweep,
    cmd_ablate,
    cmd_export,
    cmd_report,
    cmd_study,
    cmd_sweep,
    sweep_mode_help,
)
from .training import add_convert, add_models, add_train, cmd_convert, cmd_models, cmd_train
from .validation import add_validate, cmd_validate


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loralab", description="Honest, reproducible LoRA studies.")
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser (for errors found after parsing)
    add_train(sub)
    add_models(sub)
    add_merge(sub)
    add_analyze(sub)
    add_validate(sub)
    add_convert(sub)
    add_sweep(sub)
    add_ablate(sub)
    add_study(sub)
    add_report(sub)
    add_export(sub)
    return parser


COMMANDS = {
    "train": cmd_train,
    "models": cmd_models,
    "merge": cmd_merge,
    "analyze": cmd_analyze,
    "validate": cmd_validate,
    "convert": cmd_convert,
    "sweep": cmd_sweep,
    "ablate": cmd_ablate,
    "study": cmd_study,
    "report": cmd_report,
    "export": cmd_export,
}


# Commands that train: they run under the allocator `loralab.allocator` chooses.
TRAINING = ("train", "sweep", "ablate", "study")


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # the process's own command line, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    if (
        argv[:1] == ["sweep"]
        and argv[1:2] in (["worker"], ["status"])
        and {"-h", "--help"} & set(argv)
    ):
        print(sweep_mode_help(argv[1]), end="")  # not the grid options of `loralab sweep`
        return 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes one block of positionals: `train.lr=1e-3 --quiet lora.r=4` leaves the
        # second override over. Dotted overrides anywhere on the line are still overrides.
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in x and not x.startswith("-") for x in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.commands[args.command].error(unrecognized(extra, parser.commands[args.command]))
    args.argv = argv  # `study --workers N` starts siblings with the same arguments
    args.entry = entry
    # Loading reports ("newly initialized: score") are recorded in the summary instead.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if entry:  # a `kill` stops like Ctrl-C: a failed summary beside the checkpoints, exit 130
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if entry and args.command in TRAINING:
            restart = allocator.restart_command(sys.argv[0], argv)
            if restart is not None:  # a process's allocator is fixed when it starts
                sys.stdout.flush()
                sys.stderr.flush()
                os.execve(restart[0][0], restart[0], restart[1])
        return COMMANDS[args.command](args)
    except LoralabError as e:
        # The library names config keys; the user of this command reads its flags too.
        print(f"loralab: error: {with_flags(str(e), flags_of(args))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a training run says where it stopped (`stopping`)
        print(f"loralab: interrupted; {str(e) or 'checkpoints and finished files are kept.'}", file=sys.stderr)  # fmt: skip
        return 130
    except BrokenPipeError:
        # The reader went away (`loralab study --dry-run | head`): stop quietly, as a pipeline
        # member killed by SIGPIPE would, and keep the exit-time flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if isinstance(e, OSError) and e.filename is not None:
            # A file or folder the command had to read or write (read-only disk, no permission, a
            # file where a folder belongs, disk full): the user's to fix, not a bug.
            print(f"loralab: error: {os_error_text(e)}", file=sys.stderr)
            return 2
        if disk_full(e):  # torch, safetensors and PIL report it without a path, in their words
            print(f"loralab: error: {DISK_FULL}", file=sys.stderr)
            return 2
        if _in_chain(e, "attempt to write a readonly database"):  # SQLite, under Optuna
            print(f"loralab: error: {STORAGE_UNWRITABLE}", file=sys.stderr)
            return 2
        raise  # a bug: keep the traceback


DISK_FULL = (
    "The disk is full (No space left on device): the command could not write its files. Free "
    "some space, or choose an output folder on another disk, and run it again; what it had "
    "finished writing (checkpoints, run folders) is kept, so `--resume` continues a run."
)


STORAGE_UNWRITABLE = (
    "The study's SQLite storage could not be written (attempt to write a readonly database): its "
    "file was replaced, moved or deleted while the command ran (e.g. by `git stash` or `git "
    "checkout` of a committed study.db), or the file or its folder is read-only. Finished run "
    "folders are kept: run the command again on a writable storage, and finished points are "
    "reused, not retrained."
)


def disk_full(e: BaseException | None) -> bool:
    """Whether `e` or an exception it arose from is a full disk (ENOSPC)."""
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in _chain(e)):
        return True
    return _in_chain(e, "No space left on device")  # safetensors and others: only in the text


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it arose from (causes, then contexts)."""
    out: list[BaseException] = []
    while e is not None and all(e is not x for x in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _in_chain(e: BaseException | None, text: str) -> bool:
    return any(text in str(x) for x in _chain(e))


def unrecognized(extra: list[str], command: argparse.ArgumentParser) -> str:
    """'unrecognized arguments: --taks (did you mean --task?)'."""
    import difflib

    options = [o for a in command._actions for o in a.option_strings]  # argparse has no public list
    hints = [
        f"{x} (did you mean {near[0]}?)" if (near := difflib.get_close_matches(x.split("=")[0], options, 1)) else x
        for x in extra
    ]  # fmt: skip
    return f"unrecognized arguments: {' '.join(hints)}"


def os_error_text(e: OSError) -> str:
    """One paragraph for an OSError at a file boundary, credentials in its paths masked."""
    target = f"'{e.filename}'" + (f" -> '{e.filename2}'" if e.filename2 else "")
    return mask_secrets(
        f"Cannot use {target}: {e.strerror or type(e).__name__}. Check that the path is a "
        "folder you can write to (or a file you can read), on a disk with free space."
    )
