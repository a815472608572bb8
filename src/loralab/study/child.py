"""The child process that trains (or resumes) one point, its output to the point's log.

Forked from a server that has torch and `loralab.train` already imported (fast starts), so that
peak memory is the run's own and a killed worker takes its run down with it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from ..config import from_dict
from ..errors import LoralabError, TrainingDiverged
from ..resume import resume
from ..startup import freeze_imports
from ..train import train
from . import spare_cores


def child_main(action: str, config: dict, run_dir: str, log: str, err: str) -> None:
    """In the child: train (or resume) one point, output to its log; exit 0/2/3/1."""
    _die_with_parent()
    freeze_imports()  # the server imported the training stack; this process trains once
    # As `loralab train`: a SIGTERM outside the training steps (start-up, evaluations) stops it
    # like Ctrl-C, leaving a `failed` summary; during them `loralab.stopping` saves first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _thread_lock_for_tqdm()
    code = 0
    lender = spare_cores.lender()  # a core other workers leave idle speeds this point up
    callbacks = [lender] if lender is not None else []
    try:
        if action == "resume":
            trust = bool(config["model"].get("trust_remote_code"))
            resume(run_dir, quiet=True, trust_remote_code=trust, callbacks=callbacks)
        else:
            train(from_dict(config), quiet=True, callbacks=callbacks)
    except TrainingDiverged as e:
        print(f"loralab: diverged: {e}")
        code = 3
    except LoralabError as e:
        print(f"loralab: error: {e}")
        Path(err).write_text(str(e))
        code = 2
    except KeyboardInterrupt as e:  # the worker stopped: `stopping` saved a checkpoint first
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker's own SIGTERM may follow
        print(f"loralab: interrupted; {str(e) or 'stopped at once'}")
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _thread_lock_for_tqdm() -> None:
    """tqdm guards its bars with a multiprocessing lock, a named semaphore that a child stopped
    by a signal never unlinks (the worker then warns of a leaked semaphore at exit). A child
    writes its bars alone: a thread lock does."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _die_with_parent() -> None:
    """A child must not outlive its worker (else a retried point would train twice)."""
    parent = mp.parent_process()  # its sentinel is a pipe the worker holds: EOF when it dies
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
