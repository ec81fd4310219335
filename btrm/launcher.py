"""The launcher (what run_bt_rm.sh runs) and one-line error reporting, in the launcher and in the ranks.

    python -m btrm.launcher [torchrun options] bt_trainer.py [Hydra overrides]

The launcher composes the config in this one process (about a second, nothing heavy imported),
checks it (btrm.schema) and the inputs (btrm.preflight), then runs torchrun in-process.

Errors. An expected error (a config, data, checkpoint or divergence problem: ValueError, which
includes btrm.rows.DataError and PreflightError, btrm.checkpoint.CheckpointError,
bt_trainer.TrainingDiverged) is one line, `error: <what is wrong, naming the key, file or value>;
<what to do>`, printed once (by this launcher or by rank 0, never per rank), appended with a time
stamp to <trainer.default_local_dir>/errors.log (inside a run also to Hydra's
<run dir>/bt_trainer.log), and ends the launch with exit status 2 (EXIT_REPORTED) and nothing more:
torchrun's failure report is kept for unexpected failures, which show their tracebacks as usual.
BT_DEBUG=1 prints the tracebacks of expected errors too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from btrm import checkpoint
from btrm.preflight import TRUE_VALUES, check_inputs
from btrm.schema import REPO, PreflightError, check_config, check_override_keys, compose_config

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


def log_dir_for(overrides: Sequence[str]) -> str | None:
    """trainer.default_local_dir of a config the launcher could not compose, from the overrides that name knobs."""

    def names_a_knob(line: str) -> bool:
        try:
            check_override_keys([line])
        except PreflightError:
            return False
        return True

    try:
        return log_dir_of(compose_config([line for line in overrides if names_a_knob(line)]))
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


# ----------------------------------------------------------------------------- the launcher


def world_size_from(torchrun_args: Sequence[str]) -> int | None:
    """nnodes x nproc_per_node from torchrun's `--opt=value` arguments, when both are plain numbers."""
    options = {}
    for arg in torchrun_args:
        if arg.startswith("--") and "=" in arg:
            option, value = arg[2:].split("=", 1)
            options[option.replace("-", "_")] = value
    nnodes, nproc = options.get("nnodes", "1"), options.get("nproc_per_node", "1")
    return int(nnodes) * int(nproc) if nnodes.isdigit() and nproc.isdigit() else None


def live_children(parent: int | None = None) -> list[int]:
    """PIDs of the live child processes of `parent` (default: this process); Linux /proc, empty elsewhere."""
    parent = os.getpid() if parent is None else parent
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                children.append(int(Path(stat).parent.name))
    return children


class SecondInterrupt:
    """Ctrl-C twice stops at once: on the second SIGINT the ranks are killed, whatever they are doing.

    torchrun forwards the first SIGINT and waits up to --shutdown-timeout for the ranks to save; a
    second one only restarts that wait. The interpreter writes each signal's number to the wakeup fd
    as it arrives, so a thread can act on it while torchrun's main thread waits.
    """

    def __enter__(self) -> SecondInterrupt:
        self.killed = False
        self.signals = 0  # any signal this process received (faults.StopRelay relays a stop only when none came)
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._writer.fileno())
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous)
        self._writer.close()
        self._reader.close()

    def _watch(self) -> None:
        interrupts = 0
        with contextlib.suppress(OSError):
            while data := self._reader.recv(64):
                self.signals += len(data)
                interrupts += data.count(int(signal.SIGINT))
                if interrupts >= 2:
                    for pid in live_children():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.killed = True
                    return


def launch(torchrun_argv: Sequence[str]) -> int:
    """torchrun, in this process. Ranks that stopped on an expected error have said why already
    (or left it in their error file): the launch ends with their exit status and no failure report.
    Ranks that stopped on a signal end it with faults.EXIT_STOPPED when each says it saved
    (faults.stop_status); a stop that reached only the ranks is relayed to torchrun (faults.StopRelay)
    so that it does not restart them."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from btrm import faults

    parser = get_args_parser()
    torchrun_argv = fitted_to_torchrun(parser, torchrun_argv)
    # torchrun's agent logs every stopped worker; the failure itself is reported below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parser.parse_args(list(torchrun_argv))
    handled = [name.strip() for name in getattr(args, "signals_to_handle", "SIGTERM").split(",")]
    try:
        with SecondInterrupt() as interrupts, faults.StopRelay(handled, lambda: interrupts.signals > 0) as relay:
            run(args)
    except SignalException as stop:
        # torchrun forwarded a stop signal and waited for the ranks to save and exit (or killed them)
        if interrupts.killed:
            print("stopped at once by a second SIGINT: the ranks were killed", file=sys.stderr, flush=True)
            return 128 + int(signal.SIGINT)
        status, line = faults.stop_status(relay.records, stop.sigval)
        if line:
            print(line, file=sys.stderr, flush=True)
        return status
    except ChildFailedError as failed:
        codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
        # Ranks whose peer stopped first (EXIT_PEER_LOST), and ranks torchrun stopped once one had
        # (SIGTERM, or SIGKILL after --shutdown-timeout): they follow the rank that stopped first.
        followers = (faults.EXIT_PEER_LOST, -signal.SIGTERM, -signal.SIGKILL)
        if faults.EXIT_STOPPED in codes.values() and set(codes.values()) <= {faults.EXIT_STOPPED, *followers}:
            return faults.EXIT_STOPPED  # the ranks received the stop signal themselves and saved together
        reported = sorted(rank for rank, code in codes.items() if code == EXIT_REPORTED)
        stopped = [rank for rank, code in codes.items() if code in followers]
        if not reported or len(reported) + len(stopped) != len(failed.failures):
            raise  # a crash: torchrun's report with the ranks' tracebacks
        if reported[0] != 0:  # rank 0 did not report (another rank stopped first, or rank 0 runs on another node)
            message = failed.failures[reported[0]].message
            if isinstance(message, str) and message.startswith("error: "):
                print(message, file=sys.stderr, flush=True)
        return EXIT_REPORTED
    return 0


def torchrun_grace_default() -> str:
    """How long this torch's torchrun waits for the ranks after forwarding a stop signal, when no option says:
    the default of its process context's close() (30 s in torch 2.11, hard-coded there, no environment variable)."""
    import inspect

    try:
        from torch.distributed.elastic.multiprocessing.api import PContext

        return f"{inspect.signature(PContext.close).parameters['timeout'].default} s"
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return "its own default"


def fitted_to_torchrun(parser, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments less the ones this torch's torchrun does not have, each said in one line.

    run_bt_rm.sh always passes --shutdown-timeout, which torchrun gained after torch 2.11 (a cluster image or
    GPU box with an older torch than the pin); without it torchrun would refuse the whole launch. Only options
    before the training script are torchrun's; the rest are the script's own.
    """
    known = set(parser._option_string_actions)
    argv = list(argv)
    script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), len(argv))
    kept: list[str] = []
    index = 0
    while index < script:
        arg = argv[index]
        option, has_value, value = arg.partition("=")
        if option not in TORCHRUN_OPTIONAL or option in known:
            kept.append(arg)
            index += 1
            continue
        if not has_value and index + 1 < script:  # `--shutdown-timeout 900`
            value = argv[index + 1]
            index += 1
        index += 1
        print(TORCHRUN_OPTIONAL[option](value), file=sys.stderr, flush=True)
    return kept + argv[script:]


# torchrun options the launcher passes that an older torchrun lacks: what happens without each, in one line.
TORCHRUN_OPTIONAL: dict[str, Callable[[str], str]] = {
    **dict.fromkeys(
        ("--shutdown-timeout", "--shutdown_timeout"),
        lambda value: (
            f"note: this torch's torchrun has no --shutdown-timeout (added after torch 2.11): after a stop signal "
            f"the ranks get torchrun's own grace period, {torchrun_grace_default()}, to save, not {value} s "
            f"(SHUTDOWN_TIMEOUT); a save cut short leaves the last complete checkpoint"
        ),
    ),
    **dict.fromkeys(
        ("--signals-to-handle", "--signals_to_handle"),
        lambda value: (
            f"note: this torch's torchrun has no --signals-to-handle: it forwards only its default stop signals, "
            f"not all of {value} (trainer.stop_signals)"
        ),
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script = next((i for i, arg in enumerate(argv) if arg.endswith(".py")), None)
    if script is None:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return EXIT_REPORTED
    torchrun_args, overrides = argv[: script + 1], argv[script + 1 :]
    world_size = world_size_from(torchrun_args)
    config = None
    try:
        if not any(arg.startswith("-") for arg in overrides):  # Hydra's own flags (--cfg, -m, ...): left to the ranks
            config = compose_config(overrides)
            check_inputs(check_config(config, world_size=world_size), world_size)
            check_gpu_memory(config, world_size)
            torchrun_args = forward_stop_signals(torchrun_args, config)
    except ModuleNotFoundError as error:
        return missing_requirement(error)
    except EXPECTED_ERRORS as error:
        if debug_enabled():
            traceback.print_exc()
        line = error_line(error)
        print(line, file=sys.stderr, flush=True)
        append_error_log(log_dir_of(config) if config is not None else log_dir_for(overrides), line)
        return EXIT_REPORTED
    try:
        return launch(torchrun_args + overrides)
    except ModuleNotFoundError as error:  # torch itself (the ranks' own import errors stay in the ranks)
        return missing_requirement(error)


def forward_stop_signals(torchrun_args: list[str], config) -> list[str]:
    """torchrun's arguments with --signals-to-handle covering trainer.stop_signals, unless the user set it."""
    from btrm import faults

    if any(arg.startswith(("--signals-to-handle", "--signals_to_handle")) for arg in torchrun_args):
        return torchrun_args
    option = f"--signals-to-handle={faults.torchrun_signals(list(config.trainer.stop_signals))}"
    return [*torchrun_args[:-1], option, torchrun_args[-1]]


# The launcher's plan of an `auto` token budget, handed to the ranks ("tokens|source") so they need not plan again.
PLANNED_BUDGET_ENV = "BTRM_PLANNED_TOKEN_BUDGET"


def planned_budget_from_environment():
    """The batching.TokenBudget the launcher planned for this launch, or None."""
    from btrm.batching import TokenBudget

    handed_over = os.environ.get(PLANNED_BUDGET_ENV)
    if not handed_over:
        return None
    tokens, source = handed_over.split("|", 1)
    return TokenBudget(int(tokens), source)


def gpu_device_files_exist() -> bool:
    """A cheap sign of a GPU before torch is imported (run_bt_rm.sh counts GPUs the same way)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or Path("/dev/kfd").exists()


def check_gpu_memory(config, world_size: int | None) -> None:
    """On GPUs, before any weights load: the memory plan (btrm.plan) of this run. An `auto` budget is planned
    once here and handed to the ranks; a run that cannot fit even one pair is refused (plan.auto_token_budget's
    line); an explicit budget over what fits gets a warning with the largest that does."""
    if config.trainer.device == "cpu" or not gpu_device_files_exist() or not world_size:
        return
    import torch

    if not torch.cuda.is_available():
        return
    from btrm import plan

    setting = config.data.max_tokens_per_micro_batch
    if setting == "auto":
        budget = plan.auto_token_budget(config, world_size)
        os.environ[PLANNED_BUDGET_ENV] = f"{budget.tokens}|{budget.source}"
        print(f"memory plan: data.max_tokens_per_micro_batch=auto -> {budget.tokens:,} ({budget.source})", flush=True)
        return
    fitting = plan.largest_fitting_budget(config, gpus=world_size, device="cuda")
    if fitting is None:
        plan.auto_token_budget(config, world_size)  # raises its one-line refusal with what would fit
    if setting is not None and fitting is not None and setting > fitting:
        print(
            f"WARNING: the memory plan fits {fitting:,} tokens per micro-batch on these GPUs, less than "
            f"data.max_tokens_per_micro_batch={setting:,}; expect out-of-memory (bash run_bt_rm.sh --plan shows why)",
            flush=True,
        )


def missing_requirement(error: ModuleNotFoundError) -> int:
    """The usual cause: the system python instead of the project's .venv."""
    print(
        f"error: {sys.executable} cannot import {error.name} (a requirement of this project); "
        "run `bash setup.sh` to create .venv (run_bt_rm.sh then uses it), or set PYTHON to an interpreter "
        "with requirements.txt installed",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_REPORTED


if __name__ == "__main__":
    sys.exit(main())
