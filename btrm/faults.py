"""Faults a long cluster run meets: a stop signal (preemption), a hung or lost peer, a failed checkpoint write.

- **Stop signals** (trainer.stop_signals: SIGTERM from schedulers and from torchrun, SIGUSR1, Ctrl-C's
  SIGINT). StopSignals records the first one in each rank; the trainer learns at the next step
  boundary whether any rank got one, through the step's own metrics all-reduce (no collective of its
  own, so nothing is spent when no signal came), saves a complete checkpoint and exits EXIT_STOPPED.
  Schedulers signal every process of a job and torchrun forwards what it gets, so a rank often sees
  a signal twice within a second: repeats within REPEAT_WINDOW_S are the same request. A second
  SIGINT after that (Ctrl-C twice) stops at once; the save in progress, if any, never becomes complete.
- **Collective failures.** A collective that does not complete within trainer.collective_timeout_s,
  or whose peer has gone, raises a backend error that names neither the step nor the rank:
  collective_failure turns it into CollectiveTimeout (one line with the step, what the ranks were
  doing, and the ranks that did not answer, from the heartbeats each rank leaves in the store) or
  PeerLost (this rank exits quietly: the peer that stopped first says why).
- **Failed writes during a save** (a full disk, a path turned read-only) become CheckpointSaveError:
  one line naming the path and the error. btrm.checkpoint's ordering keeps the previous complete
  checkpoint and the tracker untouched, so the next run resumes from it.
- **Classification is by type.** Only torch's own distributed errors (torch.distributed.DistError, and
  the plain RuntimeError its gloo backend raises) are read as collective failures; this project's
  errors (CheckpointSaveError, CheckpointError, TrainingDiverged, any subclass) never are, whatever
  their text says (a path under `nccl-timeout-study`, an OS message naming a broken pipe).
- **A stop is final, and its status is what the ranks say.** The launcher gives its ranks a directory
  (OUTCOME_DIR_ENV) where each rank records how it ended (RankOutcome) and announces a stop before
  saving (announce_stop). The launcher's StopRelay turns an announced stop that torchrun itself did
  not receive (the ranks alone were signalled) into a stop signal to torchrun, so torchrun shuts the
  ranks down instead of restarting them; a rank restarted anyway after a stop (the relay raced, or
  could not signal) exits EXIT_STOPPED at once. After torchrun's SignalException, stop_status gives
  the launch's exit status from the ranks' records: EXIT_STOPPED only when every rank says it saved.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from btrm.checkpoint import CheckpointError

# Exit statuses of a rank and of the launch (documented in the README).
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after saving; rerun (requeue) to resume
EXIT_PEER_LOST = 3  # a rank whose peer stopped first: it says nothing, the peer's own line says why
EXIT_FAILED_SAVE = 2  # errors.EXIT_REPORTED: an expected error (a failed save among them), said in one line
REPEAT_WINDOW_S = 2.0  # the same signal again within this many seconds is the same request
# Signals a run may be asked to stop with (trainer.stop_signals). SIGKILL and SIGSTOP cannot be caught.
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")
# torchrun's own --signals-to-handle default: it forwards these to the ranks and then stops them.
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class Stopped(Exception):
    """The run stopped on a signal at a step boundary; `line` says where it saved and how to resume."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within trainer.collective_timeout_s (one line, reported as an error)."""


class PeerLost(RuntimeError):
    """A peer rank closed its connection mid-collective: it stopped, and says why itself."""


class CheckpointSaveError(CheckpointError):
    """A write of a checkpoint failed (full disk, permissions); the previous complete checkpoint stays the latest."""


# ----------------------------------------------------------------------------- stop signals


class StopSignals:
    """Records the first of `names` delivered to this process while installed (a context manager)."""

    def __init__(self, names: Sequence[str]):
        self.signals = [signal.Signals[name] for name in names]
        self.received: signal.Signals | None = None
        self._first_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Leaving on a stop (the checkpoint is saved): the process is on its way out, and a repeat of the
        # signal (torchrun's forward, the launcher's relay) must not kill it before it has reported.
        stopping = exc_type is not None and issubclass(exc_type, Stopped)
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum), now
        elif signum == signal.SIGINT and now - self._first_at > REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, whatever is in progress stays incomplete

    @property
    def requested(self) -> bool:
        return self.received is not None


def torchrun_signals(stop_signals: Sequence[str]) -> str:
    """torchrun's --signals-to-handle: its defaults and the run's stop signals, so it forwards them all."""
    names = list(TORCHRUN_SIGNALS) + [name for name in stop_signals if name not in TORCHRUN_SIGNALS]
    return ",".join(names)


# ----------------------------------------------------------------------------- collective failures

TIMEOUT_PATTERN = re.compile(r"timed out|timeout|Watchdog caught", re.IGNORECASE)
PEER_GONE_PATTERN = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe", re.IGNORECASE)
HEARTBEAT_KEY = "btrm/heartbeat/{rank}"
LOOKUP_TIMEOUT_S = 5.0  # the most a store answer may take while naming the silent ranks


def is_torch_distributed_error(error: BaseException) -> bool:
    """torch's own distributed failures: its DistError types (NCCL's watchdog, the store), or the plain
    RuntimeError its C++ backends raise (gloo's timeouts and closed connections). A subclass of
    RuntimeError is someone's own error type (this project's CheckpointSaveError, TrainingDiverged...)."""
    import torch.distributed

    return isinstance(error, torch.distributed.DistError) or type(error) is RuntimeError


class Heartbeats:
    """Each rank records in the process group's store (torch's TCPStore: no collective, still readable when a
    collective has failed) how far it got: a count of the points it passed (a step's start, a validation's
    start, once its data is in hand) and the last one. The silent ranks are those behind the reporting rank."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.count = 0

    def beat(self, step: int, doing: str) -> None:
        self.count += 1
        record = {"count": self.count, "step": step, "doing": doing}
        self.store.set(HEARTBEAT_KEY.format(rank=self.rank), json.dumps(record))

    def silent_ranks(self) -> str:
        """The ranks that did not reach the point this rank reached last, and where each was last. Never
        waits: a key is read only once the store says it exists (a get of a missing key blocks until the
        store's timeout), and the store's answers are bounded by LOOKUP_TIMEOUT_S."""
        behind = []
        with contextlib.suppress(Exception):
            self.store.set_timeout(timedelta(seconds=LOOKUP_TIMEOUT_S))
        for rank in range(self.world_size):
            key = HEARTBEAT_KEY.format(rank=rank)
            try:
                if not self.store.check([key]):  # it hung before its first heartbeat of this attempt
                    behind.append(f"rank {rank} (no heartbeat yet in this attempt)")
                    continue
                last = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001 - a store that cannot answer cannot tell
                return "the store cannot tell which rank did not answer"
            if last["count"] < self.count:
                behind.append(f"rank {rank} (last seen at step {last['step']}, {last['doing']})")
        if not behind:
            return "every rank had reached this point (one is stuck inside it)"
        return "not answering: " + ", ".join(behind)


def collective_failure(
    error: BaseException, *, step: int, doing: str, timeout_s: float, heartbeats: Heartbeats | None, rank: int
) -> RuntimeError | None:
    """CollectiveTimeout or PeerLost for torch's error from a collective; None for any other error. The type
    decides what may be a collective failure (is_torch_distributed_error); only then is torch's message read."""
    message = str(error)
    if not is_torch_distributed_error(error):
        return None
    if PEER_GONE_PATTERN.search(message):
        return PeerLost(f"rank {rank}: a peer closed its connection at step {step} while {doing}")
    if not TIMEOUT_PATTERN.search(message):
        return None
    who = heartbeats.silent_ranks() if heartbeats is not None else "the backend does not say which rank"
    first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return CollectiveTimeout(
        f"rank {rank}: a collective did not complete within trainer.collective_timeout_s={timeout_s:g} s at step {step} "
        f"while {doing}; {who} ({first_line}); a rank is hung or far slower than the others: look at its log "
        "(py-spy dump --pid PID shows where it waits), or raise trainer.collective_timeout_s"
    )


# ----------------------------------------------------------------------------- failed writes

# torch.save reports a failed write from its zip writer as a RuntimeError without an errno.
TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos", re.IGNORECASE)
# safetensors (the HF export) reports one as SafetensorError "... I/O error: <strerror> (os error N)".
SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_failure(error: BaseException, directory, latest) -> CheckpointSaveError | None:
    """One line for a write that failed while saving `directory`; None when `error` is not a failed write.
    Told apart by type: OSError, safetensors' SafetensorError, torch.save's plain RuntimeError (its zip writer)."""
    if isinstance(error, OSError):
        what, path = _os_error_text(error.errno, error.strerror or str(error)), error.filename or directory
    elif _is_safetensors_error(error):
        code = SAFETENSORS_OS_ERROR.search(str(error))
        text = os.strerror(int(code.group(1))) if code else "write failed"
        what, path = _os_error_text(int(code.group(1)) if code else None, text) + " (safetensors)", directory
    elif type(error) is RuntimeError and TORCH_WRITE_FAILURE.search(str(error)):
        what, path = f"write failed (torch.save){_free_space(directory)}", directory
    else:
        return None
    kept = (
        f"the latest complete checkpoint is still {latest} and a rerun resumes from it"
        if latest
        else "no complete checkpoint exists yet"
    )
    return CheckpointSaveError(
        f"saving {directory} failed: {path}: {what}; nothing of it counts as a checkpoint, {kept}. "
        "Free space or restore write permission there, then rerun"
    )


# ----------------------------------------------------------------------------- how the ranks ended

# The launcher's directory for this launch (one per node): each rank's record of how it ended, and the
# ranks' announcements of a stop. Unset (bt_trainer.py run by torchrun directly): nothing is recorded.
OUTCOME_DIR_ENV = "BTRM_OUTCOME_DIR"
STOP_ANNOUNCED = "stop-rank-{rank}.json"  # a rank is stopping on a signal: it saves, then exits EXIT_STOPPED
STOP_RELAYED = "stop-relayed"  # the launcher has acted on the announcement (or found torchrun already stopping)
RECORD = "rank-{rank}.json"  # {"rank", "attempt", "exit": None while running, "line": its error line}
RELAY_POLL_S = 0.1  # how often the launcher looks for an announced stop
RELAY_WAIT_S = 10.0  # the most a stopped rank waits for the launcher to have acted before it exits


def _outcome_dir() -> Path | None:
    directory = os.environ.get(OUTCOME_DIR_ENV)
    return Path(directory) if directory else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _write_json(path: Path, record: dict) -> None:
    """Whole or absent: a reader never sees half a record."""
    with contextlib.suppress(OSError):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)


def announce_stop(stop_signals: Sequence[str]) -> None:
    """Called by every rank once the ranks agree to stop, before the save: the launcher (StopRelay) ends
    torchrun's run, so that torchrun does not restart ranks that exit EXIT_STOPPED. `stop_signals` are the
    signals this rank treats as a stop (trainer.stop_signals): the launcher relays one of them."""
    directory = _outcome_dir()
    if directory is not None:
        record = {"rank": _rank(), "attempt": _attempt(), "stop_signals": list(stop_signals)}
        _write_json(directory / STOP_ANNOUNCED.format(rank=_rank()), record)


def stop_announced(directory: Path) -> dict | None:
    """The first rank's stop announcement in `directory`, if any."""
    for path in sorted(directory.glob(STOP_ANNOUNCED.format(rank="*"))):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
    return None


class RankOutcome:
    """In a rank (bt_trainer.main): records how the rank ended for the launcher, as {"exit": status}.

    On entry it records the rank as running; a rank that torchrun restarted after the ranks stopped on
    a signal (the launcher could not prevent the restart) exits EXIT_STOPPED at once, without training.
    On a stop it waits (at most RELAY_WAIT_S) until the launcher has acted on the announcement, so that
    torchrun is already stopping when this rank's exit reaches it."""

    def __enter__(self) -> RankOutcome:
        self.directory = _outcome_dir()
        if self.directory is None:
            return self
        earlier = rank_records(self.directory).get(_rank(), {}).get("exit")
        self._record(None)
        if _attempt() > 0 and stop_announced(self.directory) is not None:
            # the earlier attempt's own status: 75 after a save, 2 after a failed one (its line said why)
            status = earlier if isinstance(earlier, int) and earlier not in (0, EXIT_PEER_LOST) else EXIT_STOPPED
            if _rank() == 0:
                print(
                    "stopped: a stop signal ended an earlier attempt of this launch; not training on after "
                    "torchrun's restart. Run the same command again to resume",
                    flush=True,
                )
            self._record(status)
            raise SystemExit(status)
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        if self.directory is None:
            return
        if exc_type is None:
            status = 0
        elif issubclass(exc_type, SystemExit):
            status = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        else:
            status = 1
        self._record(status)
        if status == EXIT_STOPPED:
            deadline = time.monotonic() + RELAY_WAIT_S
            while not (self.directory / STOP_RELAYED).exists() and time.monotonic() < deadline:
                time.sleep(RELAY_POLL_S / 2)

    def _record(self, status: int | None) -> None:
        record = {"rank": _rank(), "attempt": _attempt(), "exit": status}
        line = _error_file_line()
        if status not in (None, 0, EXIT_STOPPED) and line:
            record["line"] = line
        _write_json(self.directory / RECORD.format(rank=_rank()), record)


def reports_outcome(main: Callable) -> Callable:
    """bt_trainer.main wrapped in RankOutcome."""

    @functools.wraps(main)
    def reporting(*args, **kwargs):
        with RankOutcome():
            return main(*args, **kwargs)

    return reporting


def _error_file_line() -> str | None:
    """The one line this rank left in torchrun's error file (errors.errors_reported_once writes it)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        message = json.loads(Path(error_file).read_text())["message"]
        return message if isinstance(message, str) and message.startswith("error: ") else None
    return None


def rank_records(directory: Path) -> dict[int, dict]:
    records = {}
    for path in directory.glob(RECORD.format(rank="*")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            records[int(record["rank"])] = record
    return records


def stop_status(records: dict[int, dict], received: signal.Signals) -> tuple[int, str | None]:
    """The launch's exit status once torchrun has stopped on `received` (its SignalException), from what
    each rank recorded, and a line to print (None when a rank has said it already).

    EXIT_STOPPED only when every rank says it stopped after saving (or all finished: 0). A rank that
    reported an error (a failed save: exit 2) makes it that error, its line printed here unless rank 0
    printed it. A rank that ended without reporting (killed by the signal before training, or by torchrun
    at its --shutdown-timeout while saving) makes it 128 + the signal, with a line naming those ranks."""
    statuses = {rank: record.get("exit") for rank, record in sorted(records.items())}
    if records and set(statuses.values()) <= {EXIT_STOPPED}:
        return EXIT_STOPPED, None
    if records and set(statuses.values()) == {0}:
        return 0, None
    reported = [rank for rank, status in statuses.items() if status == EXIT_FAILED_SAVE]
    if reported:
        line = records[reported[0]].get("line") if reported[0] != 0 else None
        return EXIT_FAILED_SAVE, line
    if not records:
        return 128 + int(received), f"error: stopped by {received.name} before any rank started; nothing was saved"
    unsaved = [rank for rank, status in statuses.items() if status != EXIT_STOPPED]
    ranks = ", ".join(str(rank) for rank in unsaved)
    which = f"rank {ranks} ended" if len(unsaved) == 1 else f"ranks {ranks} ended"
    return 128 + int(received), (
        f"error: stopped by {received.name}, but {which} without saying it saved (killed by the signal before "
        "training began, or by torchrun after --shutdown-timeout (SHUTDOWN_TIMEOUT) while saving, or failed "
        "otherwise: see its output above); the latest complete checkpoint is the one the tracker names, and a "
        "rerun resumes from it"
    )


class StopRelay:
    """In the launcher: this launch's outcome directory (OUTCOME_DIR_ENV, inherited by the ranks), and a
    thread that turns a stop the ranks announce (announce_stop) into a stop signal to this process when it
    did not receive one itself, so that torchrun shuts the ranks down rather than restarting them.

    `handled` are the signals torchrun catches here (its --signals-to-handle): the relayed one is the first
    of the rank's stop signals among them, never SIGINT (a repeated SIGINT is Ctrl-C twice: stop at once).
    `already_signalled()` says whether this process has received a signal (torchrun is then stopping, and
    a second signal would cut its wait for the ranks short)."""

    def __init__(self, handled: Sequence[str], already_signalled: Callable[[], bool]):
        self.handled, self.already_signalled = list(handled), already_signalled
        self.relayed: signal.Signals | None = None

    def __enter__(self) -> StopRelay:
        self.directory = Path(tempfile.mkdtemp(prefix="btrm-launch-"))
        self._previous = os.environ.get(OUTCOME_DIR_ENV)
        os.environ[OUTCOME_DIR_ENV] = str(self.directory)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.records = rank_records(self.directory)  # how the ranks ended, kept: the directory goes
        if self._previous is None:
            os.environ.pop(OUTCOME_DIR_ENV, None)
        else:
            os.environ[OUTCOME_DIR_ENV] = self._previous
        shutil.rmtree(self.directory, ignore_errors=True)

    def _watch(self) -> None:
        while not self._done.wait(RELAY_POLL_S):
            announced = stop_announced(self.directory)
            if announced is None:
                continue
            candidates = [name for name in announced.get("stop_signals", []) if name != "SIGINT"]
            relay = next((name for name in candidates if name in self.handled), None)
            if relay is not None and not self.already_signalled():
                self.relayed = signal.Signals[relay]
                os.kill(os.getpid(), self.relayed)
            elif relay is None and not self.already_signalled():
                print(
                    "WARNING: the ranks stopped on a signal torchrun was not sent, and none of trainer.stop_signals "
                    f"({', '.join(candidates) or 'none but SIGINT'}) is among torchrun's --signals-to-handle: "
                    "torchrun may restart them (they then exit at once)",
                    file=sys.stderr,
                    flush=True,
                )
            (self.directory / STOP_RELAYED).touch()
            return


def _os_error_text(code: int | None, text: str) -> str:
    name = errno.errorcode.get(code, "") if code else ""
    return text + (f" ({name})" if name else "")


def _is_safetensors_error(error: BaseException) -> bool:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return False
    return isinstance(error, SafetensorError)


def _free_space(directory) -> str:
    """'; N bytes free on its filesystem' (torch's zip writer does not say why a write failed)."""
    for path in (Path(directory), *Path(directory).parents):
        with contextlib.suppress(OSError):
            return f"; {shutil.disk_usage(path).free:,} bytes free on its filesystem"
    return ""
