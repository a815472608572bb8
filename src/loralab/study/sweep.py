"""`loralab sweep` / `loralab ablate`: create (or continue) a plan's study and run its points."""

from __future__ import annotations

from .grid import Plan, default_study_name, plan_trusts
from .reuse import check_run_folders
from .storage import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_RETRY,
    create_or_check,
    open_storage,
    storage_url,
)
from .worker import Worker


def run_sweep(plan: Plan, study_name: str | None = None, storage: str | None = None,
              heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None,
              max_retry: int = DEFAULT_MAX_RETRY, create_only: bool = False, quiet: bool = False,
              trust_remote_code: bool = False):  # fmt: skip
    """Create (or continue) the study of `plan` and run its points here until none is left.

    With `create_only`, only create it: workers (`loralab sweep worker`) run the points.
    Returns the worker's report, or None with `create_only`.
    """
    name = study_name or default_study_name(plan)
    check_run_folders([plan], plan.results_dir)
    st = open_storage(storage_url(storage, plan.results_dir), heartbeat, grace, max_retry)
    create_or_check(st, name, plan)
    if create_only:
        return None
    trust = trust_remote_code or plan_trusts(plan)  # this command line asked for it
    return Worker(st, name, None, plan.results_dir, heartbeat, quiet, trust).run()
