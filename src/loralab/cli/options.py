"""Argument helpers shared by the subcommands: the parser, value types, common options and the
pre-flight checks that fail before slow work."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LoralabError
from ..hub import check_push, push_folder
from ..rundir import check_not_a_run, check_writable


class Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other user error: one paragraph, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"loralab: error: {self.prog}: {message}. See `{self.prog} --help`.\n")


def int_at_least(low: int):
    """An argparse type: an integer >= low (a bad value is a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_trust(p) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with a hub model to run (never taken from a run folder or study)",
    )


def add_push(p, what: str) -> None:
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help=f"upload {what} to this hub repository (user/name); token from HF_TOKEN",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def check_push_flags(args) -> None:
    """The push target before any work; --private without a push is a mistake, not a no-op."""
    if args.private and not args.push_to_hub:
        raise LoralabError(
            "--private makes the --push-to-hub repository private: give --push-to-hub user/name "
            "too, or drop --private."
        )
    if args.push_to_hub:
        check_push(args.push_to_hub, "--push-to-hub")


def push(args, folder, what: str) -> None:
    """Upload `folder` when --push-to-hub was given."""
    if not getattr(args, "push_to_hub", None):
        return
    url = push_folder(folder, args.push_to_hub, what, private=args.private)
    if not getattr(args, "quiet", False):
        print(f"pushed the {what} to {url}")


def check_results_dir(path) -> None:
    check_writable(path, "--output-dir")
    check_not_a_run(path, "--output-dir")


def check_out_file(path: Path, what: str) -> None:
    """Fail before slow work when file `path` cannot be written."""
    if path.is_dir():
        raise LoralabError(f"{what} '{path}' is a folder; give a file path, e.g. validate.json.")
    check_writable(path.parent if str(path.parent) else Path("."), f"The folder of {what}")
    if path.is_file() and path.stat().st_size and not _is_validate_report(path):
        raise LoralabError(
            f"{what} '{path}' already exists and is not a `loralab validate` report: writing the "
            "report there would destroy it. Give a new file name, e.g. validate.json; nothing "
            "was changed."
        )


def _is_validate_report(path: Path) -> bool:
    """Whether `path` holds an earlier validate report (which a new one may replace)."""
    import json

    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and {"n_checks", "checks", "passed"} <= old.keys()


def refuse_unused(overrides: list[str], used: tuple[str, ...], command: str) -> None:
    """Overrides a command would ignore are errors (exit 2), never silently dropped."""
    for item in overrides:
        if not item.strip().startswith(used):
            raise LoralabError(
                f"{item} cannot be honoured: `loralab {command}` uses only "
                f"{', '.join(u.rstrip('=') + ('*' if u.endswith('.') else '') for u in used)} "
                "from the config (its probe data and steps are its own options). "
                "Drop it."
            )
