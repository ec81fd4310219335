"""The launcher (what run_bt_rm.sh runs): checks, then torchrun in this process. It runs outside the ranks.

    python -m btrm.launcher [torchrun options] bt_trainer.py [Hydra overrides]

The launcher composes the config in this one process (about a second, nothing heavy imported),
checks it (btrm.schema) and the inputs (btrm.preflight), then runs torchrun in-process.

Errors are one line each (btrm.errors, shared with the ranks); what the launcher hands the ranks
through the environment is btrm.handover's.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from btrm import handover
from btrm.errors import (
    EXIT_REPORTED,
    EXPECTED_ERRORS,
    append_error_log,
    debug_enabled,
    error_line,
    log_dir_of,
)
from btrm.preflight import check_inputs
from btrm.schema import PreflightError, check_config, check_override_keys, compose_config


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
    gc.freeze()  # what the checks and torch imported lives to the end: the collector skips it (a faster exit)
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
        os.environ[handover.PLANNED_BUDGET_ENV] = handover.encode_budget(budget)
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
