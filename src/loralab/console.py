"""Console hygiene: known third-party noise silenced where it starts.

Only the warnings and progress bars listed here are silenced, and only around the calls that
emit them; every other warning still reaches the user.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (category, message regex) of deprecation notices that users cannot act on.
KNOWN_WARNINGS = (
    # datasets.Dataset.sort passes null_placement the way pyarrow 25 deprecated.
    (FutureWarning, r"Specifying null_placement in SortOptions is deprecated"),
    # PEFT reads model.is_gradient_checkpointing, which transformers 5 renamed.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


@contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Ignore only the KNOWN_WARNINGS inside the block."""
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextmanager
def library_bars_off() -> Iterator[None]:
    """No transformers ("Loading weights", "Writing model shards") or datasets ("Saving the
    dataset") progress bars inside the block; their previous state is restored afterwards.
    The hub's download bars stay as they were: a download takes minutes and is worth showing
    (transformers' switch turns them off too; --quiet turns them off for the whole command)."""
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_on = hf_logging.is_progress_bar_enabled()
    ds_on = datasets.is_progress_bar_enabled()
    hub_on = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if hub_on:
        hub_utils.enable_progress_bars()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            hf_logging.enable_progress_bar()
        (hub_utils.enable_progress_bars if hub_on else hub_utils.disable_progress_bars)()
        if ds_on:
            datasets.enable_progress_bars()
