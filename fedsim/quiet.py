"""Quiet output: what fedsim prints is its own. Libraries' progress bars (``datasets``), advisory warnings and
notices (bitsandbytes' optional CPU kernels, transformers' deprecations) are switched off unless ``--verbose`` (or
``FEDSIM_VERBOSE=1``); errors always show. Ray worker processes inherit the setting through the environment."""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "FEDSIM_VERBOSE"
QUIET = "FEDSIM_QUIET"  # set by the command line: worker processes started for it stay quiet too


def verbose() -> bool:
    return os.environ.get(ENV, "0").lower() not in ("", "0", "false", "no")


def worker_output_wanted() -> bool:
    """Whether worker processes' output should reach the driver's console: always, except in a quiet command-line
    run (``FEDSIM_QUIET=1`` without ``--verbose``), where all it would show is the libraries' chatter."""
    return verbose() or os.environ.get(QUIET) != "1"


def silence_libraries(mark: bool = False) -> None:
    """Turn library chatter off in this process (idempotent; a no-op with ``FEDSIM_VERBOSE=1``). ``mark``: also
    ask worker processes started from here to do the same (the command line does; a library user's process is
    left as it is unless it sets ``FEDSIM_QUIET=1``)."""
    if verbose():
        return
    if mark:
        os.environ[QUIET] = "1"
    elif os.environ.get(QUIET) != "1":
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-evaluation-harness's bars (tqdm reads it per bar)
    # Ray's notice that it turned token authentication on for a new local cluster (its default) is advice, not news
    for name in ("bitsandbytes", "datasets", "transformers", "peft", "hqq", "torchao", "lm_eval", "lm-eval",
                 "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "peft", "bitsandbytes", "datasets", "hqq", "torch"):
            warnings.filterwarnings("ignore", category=category, module=module)
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    datasets = sys.modules.get("datasets")
    if datasets is not None:  # imported already: the variables above came too late for it (importing it here
        datasets.disable_progress_bars()  # would cost every process ~100 MB and a second)
        datasets.logging.set_verbosity_error()
