"""One-line error reporting, in the launcher and in the ranks: `error: <what>; <what to do>`, exit status 2.

An expected error (a config, data, checkpoint or divergence problem: ValueError, which includes
btrm.rows.DataError and PreflightError, btrm.checkpoint.CheckpointError, btrm.fault_guard.TrainingDiverged)
is one line, printed once (by the launcher or by rank 0, never per rank), appended with a time stamp to
<trainer.default_local_dir>/errors.log (inside a run also to Hydra's <run dir>/bt_trainer.log), and ends
the launch with exit status 2 (EXIT_REPORTED) and nothing more: torchrun's failure report is kept for
unexpected failures, which show their tracebacks as usual. BT_DEBUG=1 prints the tracebacks of expected
errors too. The ranks import this module, never btrm.launcher (which runs outside them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from btrm import checkpoint
from btrm.preflight import TRUE_VALUES
from btrm.schema import REPO, PreflightError

EXIT_REPORTED = 2  # a rank or the launcher stopped on an expected error and has already said why in one line
DEBUG_ENV = "BT_DEBUG"  # BT_DEBUG=1: tracebacks for expected errors too
# Errors that are the user's to fix, reported in one line without a traceback (bt_trainer adds TrainingDiverged).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, checkpoint.CheckpointError)
PROJECT_DIRS = (REPO, Path(__file__).resolve().parent)  # the entry scripts, and this package


def checked_on_rank0(check: Callable[[], Any]):
    """check() on rank 0 only (one hub probe, not one per rank); every rank gets its result or raises its error."""
    import torch.distributed as dist

    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", check())
        except EXPECTED_ERRORS as error:
            outcome[0] = ("error", str(error))
            dist.broadcast_object_list(outcome, src=0)
            raise
        except Exception:
            outcome[0] = ("crash", None)
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "ok":
        return value
    if status == "error":
        raise PreflightError(value)
    # rank 0 crashed and shows the traceback; wait for torchrun to stop this rank rather than exit
    # first and be taken for the failure's cause
    time.sleep(30)
    raise SystemExit(1)


# ----------------------------------------------------------------------------- one line per error


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").upper() in TRUE_VALUES


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line. Errors raised outside this project's files also say where,
    since their message alone may not name the setting."""
    message = " ".join(str(error).split()) or type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        origin = Path(frames[-1].filename).resolve()
        if origin.parent not in PROJECT_DIRS:
            message += (
                f" ({type(error).__name__} in {origin.name}:{frames[-1].lineno}; {DEBUG_ENV}=1 shows the traceback)"
            )
    return f"error: {message}"


def append_error_log(log_dir: str | os.PathLike | None, line: str) -> Path | None:
    """Append the line, time-stamped, to <log_dir>/errors.log; a log that cannot be written is skipped."""
    if not log_dir:
        return None
    path = Path(log_dir) / "errors.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    except OSError:
        return None
    return path


def log_dir_of(config) -> str | None:
    """trainer.default_local_dir of a (possibly broken) config, or None if it cannot be resolved."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(config, "trainer.default_local_dir", throw_on_resolution_failure=True)
        return str(value) if value else None
    except Exception:
        return None


def write_torchelastic_error_file(line: str) -> None:
    """The rank's error file (torchrun names it in TORCHELASTIC_ERROR_FILE): the launcher reads it when rank 0 has not reported."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError), open(error_file, "w", encoding="utf-8") as out:
            json.dump({"message": line, "timestamp": int(time.time())}, out)


@contextlib.contextmanager
def errors_reported_once(
    expected: tuple[type[BaseException], ...],
    *,
    log_dir: Callable[[], str | None],
    run_log: Callable[[str], None] | None = None,
):
    """In a rank: an expected error becomes one line from rank 0 (console, errors.log, run log) and exit status 2.

    Other ranks say nothing (their error file holds the line for the launcher) and wait a moment
    before exiting, so that rank 0, which usually fails the same way at the same time, is the one
    torchrun sees first; torchrun then stops them.
    """
    try:
        yield
    except expected as error:
        line = error_line(error)
        if debug_enabled():
            traceback.print_exc()
        write_torchelastic_error_file(line)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stdout.flush()
            print(line, file=sys.stderr, flush=True)
            append_error_log(log_dir(), line)
            if run_log is not None:
                run_log(line)
        else:
            time.sleep(2)
        raise SystemExit(EXIT_REPORTED) from None
