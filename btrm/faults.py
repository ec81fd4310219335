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
"""

from __future__ import annotations

import errno
import json
import re
import signal
import time
from collections.abc import Sequence

from btrm.checkpoint import CheckpointError

# Exit statuses of a rank and of the launch (documented in the README).
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after saving; rerun (requeue) to resume
EXIT_PEER_LOST = 3  # a rank whose peer stopped first: it says nothing, the peer's own line says why
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

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
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
        """The ranks that did not reach the point this rank reached last, and where each was last."""
        behind = []
        for rank in range(self.world_size):
            try:
                last = json.loads(self.store.get(HEARTBEAT_KEY.format(rank=rank)))
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
    """CollectiveTimeout or PeerLost for a backend error raised by a collective; None for any other error."""
    message = str(error)
    if not isinstance(error, RuntimeError) or isinstance(error, (CollectiveTimeout, PeerLost)):
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


def save_failure(error: BaseException, directory, latest) -> CheckpointSaveError | None:
    """One line for a write that failed while saving `directory`; None when `error` is not a failed write."""
    if isinstance(error, OSError):
        name = errno.errorcode.get(error.errno, "") if error.errno else ""
        what = f"{error.strerror or error}" + (f" ({name})" if name else "")
        path = error.filename or directory
    elif isinstance(error, RuntimeError) and TORCH_WRITE_FAILURE.search(str(error)):
        what, path = "write failed (torch.save; the disk may be full)", directory
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
