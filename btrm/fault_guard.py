"""The trainer's fault guard: what the ranks are doing, stop signals, divergence, and what a failure means.

One object per rank, built from trainer.yaml's `trainer:` section. The training loop tells it where
it is (`doing`, which also leaves a heartbeat in the store); it answers three questions:
- `stop_decided(step, last_step)`: the one place where a stop on a signal is decided (a rank received
  one of trainer.stop_signals; the step's metrics all-reduce carried every rank's vote);
- `check_divergence(state)`: too many consecutive non-finite steps stop the run, unsaved;
- `classify(error, step)` / `classify_save(error, directory, latest)`: the one place where failures are
  classified (a collective that timed out or lost its peer becomes one line naming the step and the
  silent ranks; a write that failed during a save, one line naming the path; anything else: None).
The mechanisms (signal handlers, heartbeats, the classification rules) are btrm.faults'.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

from btrm import checkpoint, faults

if TYPE_CHECKING:
    from btrm.config import TrainerSection


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, or non-finite weights about to be saved."""


class FaultGuard:
    """Stop signals, heartbeats, divergence and failure classification for one rank (see the module doc)."""

    def __init__(self, trainer: TrainerSection, heartbeats: faults.Heartbeats | None, rank: int):
        self.settings, self.heartbeats, self.rank = trainer, heartbeats, rank
        self.doing = "starting"  # what the ranks are doing, for a collective that fails
        self.stop_signals = faults.StopSignals([])  # the signals this rank received (installed while watching)
        self.stop_agreed = False  # some rank received one: the step's metrics all-reduce says so
        self.stopped_by: signal.Signals | None = None  # this rank's own signal when the ranks agreed to stop

    @contextlib.contextmanager
    def watching(self) -> Iterator[FaultGuard]:
        """trainer.stop_signals' handlers installed for the block (fit's loop)."""
        with faults.StopSignals(self.settings.stop_signals) as self.stop_signals:
            yield self

    def at(self, step: int, doing: str, *, beat: str | None = None) -> None:
        """The ranks now do `doing`; with `beat`, this rank also leaves a heartbeat saying so."""
        if beat is not None and self.heartbeats is not None:
            self.heartbeats.beat(step, beat)
        self.doing = doing

    # ---- stop signals

    def stop_vote(self) -> float:
        """This rank's vote for the step's metrics all-reduce: 1 when it received a stop signal."""
        return float(self.stop_signals.requested)

    def count_votes(self, votes: float) -> None:
        """The all-reduced votes: any rank's signal stops every rank at this step boundary."""
        self.stop_agreed = votes > 0
        # Who stopped the run, as known when the ranks agreed: the launcher relays the stop to every rank
        # during the save, and that relayed signal must not be reported as the one that stopped it.
        self.stopped_by = self.stop_signals.received

    def stop_decided(self, step: int, last_step: int) -> bool:
        """Stop now on a signal (at the last step the run ends anyway)."""
        return self.stop_agreed and step < last_step

    def announce_stop(self) -> None:
        """Before the stop's save: the launcher then ends torchrun's run instead of restarting the ranks."""
        faults.announce_stop(self.settings.stop_signals)

    def stopped(self, step: int, last_step: int, saved: str) -> faults.Stopped:
        """The one line a stopped run ends with: who stopped it, what was saved, how to resume."""
        by = self.stopped_by.name if self.stopped_by is not None else "a signal another rank received"
        return faults.Stopped(
            f"stopped by {by} after step {step} of {last_step}: {saved}. To resume, run the same command again "
            "(trainer.resume_mode=auto continues from the tracked checkpoint), or add trainer.resume_from_path=<checkpoint>"
        )

    # ---- divergence

    def check_divergence(self, state: checkpoint.TrainerState) -> None:
        """Raise TrainingDiverged after trainer.max_consecutive_skipped_steps non-finite steps in a row."""
        if state.consecutive_skipped_steps >= self.settings.max_consecutive_skipped_steps:
            raise TrainingDiverged(
                f"{state.consecutive_skipped_steps} consecutive steps had non-finite gradients (last: step {state.step}, "
                f"{state.skipped_steps} skipped in all); stopping without saving. Last good checkpoint: "
                f"{checkpoint.latest_complete(self.settings.default_local_dir)}. Lower optim.lr or optim.clip_grad."
            )

    # ---- failures

    def classify(self, error: BaseException, step: int) -> RuntimeError | None:
        """A collective's backend error as faults.CollectiveTimeout or faults.PeerLost; None for any other error."""
        return faults.collective_failure(
            error,
            step=step,
            doing=self.doing,
            timeout_s=self.settings.collective_timeout_s,
            heartbeats=self.heartbeats,
            rank=self.rank,
        )

    def classify_save(self, error: BaseException, directory, latest) -> faults.CheckpointSaveError | None:
        """A failed write while saving `directory` as one line (faults.CheckpointSaveError); None for any other error."""
        return faults.save_failure(error, directory, latest)
