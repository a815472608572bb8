"""Config keys <-> command-line flags.

The library names config keys in its errors ("data.data_dir"), so a library user reads what
they set. The CLI adds the flag that sets the same key ("data.data_dir (--data-dir)") before
printing, so a command-line user reads what they typed.
"""

from __future__ import annotations

import re
from argparse import Namespace

# Config key -> the flag that sets it (`loralab train`; other commands share the spellings).
FLAGS = {
    "model.name": "--model",
    "model.head": "--head",
    "model.trust_remote_code": "--trust-remote-code",
    "data.task": "--task",
    "data.data_dir": "--data-dir",
    "data.train_file": "--train-file",
    "data.eval_file": "--eval-file",
    "data.max_train_examples": "--max-train-examples",
    "data.max_eval_examples": "--max-eval-examples",
    "train.method": "--method",
    "run.output_dir": "--output-dir",
}

# Keys whose flag means the same only in some commands: `study --output-dir` is the results
# folder, not the run folder.
ONLY_IN = {"run.output_dir": {"train"}}

# A value written right after the key (`model.head=lm`): ends on a word character, so a
# sentence's full stop or comma is not taken in.
_VALUE = r"=[^\s,;:()'\"]*[\w/-]"


def _pattern(key: str) -> re.Pattern:
    # Not inside a longer key ('base.data.task', 'data.task_x'); a quoted key keeps its quotes
    # together ("'model.head' (--head)"); `key=value` keeps its value ("model.head=lm (--head lm)").
    return re.compile(
        rf"(?<![\w.'])(?P<q>'?){re.escape(key)}(?P<value>{_VALUE})?(?P=q)(?![\w=]|\.\w| \(--)"
    )


def flags_of(args: Namespace | None) -> dict[str, str]:
    """The FLAGS entries the parsed command has an option for (all of them without `args`)."""
    if args is None:
        return dict(FLAGS)
    command = getattr(args, "command", None)
    return {
        k: f
        for k, f in FLAGS.items()
        if hasattr(args, f[2:].replace("-", "_")) and command in ONLY_IN.get(k, {command})
    }


def with_flags(text: str, flags: dict[str, str] | None = None) -> str:
    """`text` with each config key in `flags` followed by its flag in parentheses."""

    def add_flag(flag: str):
        def replace(m: re.Match) -> str:
            value = m["value"]
            shown = flag if not value or flag == "--trust-remote-code" else f"{flag} {value[1:]}"
            return f"{m[0]} ({shown})"

        return replace

    for key, flag in (FLAGS if flags is None else flags).items():
        text = _pattern(key).sub(add_flag(flag), text)
    return text
