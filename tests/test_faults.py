"""btrm.faults on real 2-rank runs: stop signals save and exit 75, a killed rank restarts and resumes
exactly, a hung peer is named, a failed save loses nothing. Each interrupted run ends, once rerun,
equal to the uninterrupted reference run (conftest.reference_run) to every digit."""

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from btrm import checkpoint, faults, launcher
from conftest import REFERENCE, REPO, history, run_trainer, trainer_env

INJECTION = (f"data.custom_cls.path={REPO / 'tests' / 'fault_injection.py'}", "data.custom_cls.name=PairDataset")


# ----------------------------------------------------------------------------- helpers


def start_trainer(tmp_path, model_dir, data_dir, *overrides, name, extra_env=None) -> subprocess.Popen:
    """run_bt_rm.sh in the background (its bash execs the launcher: the PID is torchrun's)."""
    env = {**trainer_env(tmp_path, model_dir, data_dir, 2, name), **(extra_env or {})}
    return subprocess.Popen(
        ["bash", str(REPO / "run_bt_rm.sh"), "trainer.logger=[console,file]", "trainer.device=cpu", *overrides],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(tmp_path, name) -> list[int]:
    path = tmp_path / "ckpt" / name / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(process, tmp_path, name, step, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(tmp_path, name), default=0) < step:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.1)


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (their RANK from /proc/PID/environ)."""
    pids = {}
    for pid in launcher.live_children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_text().split("\0")
        except OSError:
            continue
        rank = next((item.split("=", 1)[1] for item in environ if item.startswith("RANK=")), None)
        if rank is not None:
            pids[int(rank)] = pid
    return pids


def finish(process, timeout=300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def tracked_step(tmp_path, name) -> int:
    return checkpoint.read_tracker(tmp_path / "ckpt" / name)


# ----------------------------------------------------------------------------- stop signals


def test_repeated_signal_is_one_request_and_a_second_ctrl_c_stops_at_once(monkeypatch):
    with faults.StopSignals(["SIGTERM", "SIGINT", "SIGUSR1"]) as stops:
        assert not stops.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forward right after the scheduler's own
        os.kill(os.getpid(), signal.SIGINT)  # within the repeat window: the same request
        assert stops.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored on leaving
    monkeypatch.setattr(faults, "REPEAT_WINDOW_S", 0.0)
    with faults.StopSignals(["SIGINT"]) as stops, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    assert stops.received == signal.SIGINT


def test_a_rank_leaving_on_a_stop_ignores_further_stop_signals():
    """After the save, torchrun's forward or the launcher's relay of the stop must not kill the rank before it
    reports (its record says 75 only once it exits through bt_trainer.main)."""
    try:
        with pytest.raises(faults.Stopped), faults.StopSignals(["SIGTERM", "SIGUSR1"]):
            raise faults.Stopped("stopped by SIGTERM after step 3 of 12: saved ...")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process with the default action
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_torchrun_forwards_the_configured_signals():
    assert faults.torchrun_signals(["SIGTERM", "SIGUSR1"]) == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def test_stop_signals_save_and_exit_75_and_the_rerun_equals_the_uninterrupted_run(
    tmp_path, reference_run, tiny_model_dir, demo_data_dir
):
    """1: SIGUSR1 to rank 1 alone (the other rank learns of it at the step boundary); 2: SIGTERM to torchrun
    and to both ranks, as a scheduler signals every process (each rank sees it twice); 3: Ctrl-C twice
    exits at once; 4: the rerun ends equal to the uninterrupted run."""
    _, _, full = reference_run
    name = "stopped"

    first = start_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name)
    wait_for_step(first, tmp_path, name, 4)
    os.kill(rank_pids(first.pid)[1], signal.SIGUSR1)
    code, out, err = finish(first)
    stopped_at = max(logged_steps(tmp_path, name))
    assert code == faults.EXIT_STOPPED, out[-2000:] + err[-3000:]
    assert 4 <= stopped_at < 12
    assert f"stopped by a signal another rank received after step {stopped_at} of 12: saved " in out
    assert f"global_step_{stopped_at}. To resume, run the same command again" in out
    assert tracked_step(tmp_path, name) == stopped_at  # the step during which the signal came, complete
    assert (tmp_path / "ckpt" / name / f"global_step_{stopped_at}" / "bt_state.json").is_file()

    second = start_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name)
    wait_for_step(second, tmp_path, name, stopped_at + 2)
    ranks = rank_pids(second.pid)
    for pid in (second.pid, *ranks.values()):
        os.kill(pid, signal.SIGTERM)
    code, out, err = finish(second)
    stopped_again = max(logged_steps(tmp_path, name))
    assert code == faults.EXIT_STOPPED, out[-2000:] + err[-3000:]
    assert f"stopped by SIGTERM after step {stopped_again} of 12: saved " in out
    assert out.count("stopped by SIGTERM") == 1  # twice received, one request, one line
    assert tracked_step(tmp_path, name) == stopped_again

    third = start_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name)
    wait_for_step(third, tmp_path, name, stopped_again + 1)
    started = time.monotonic()
    os.kill(third.pid, signal.SIGINT)
    time.sleep(0.2)  # torchrun forwards only the first; the second ends its wait for the ranks' step and save
    os.kill(third.pid, signal.SIGINT)
    code, out, err = finish(third)
    assert code == 128 + signal.SIGINT, out[-2000:] + err[-3000:]
    assert time.monotonic() - started < 60  # not torchrun's 900 s shutdown timeout
    assert not rank_pids(third.pid)
    resumable = checkpoint.find_resume_checkpoint(
        tmp_path / "ckpt" / name, mode="auto", resume_from_path=None, world_size=2, load_contents=["model"]
    )
    assert resumable is not None  # whatever the interrupted save reached, the tracked checkpoint is complete

    run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name)
    got = history(tmp_path, name)
    for step in got:  # a stopped launch does not validate; its resumed launch does not validate that step again
        if step in full and not any(k.startswith("val/") for k in got[step]):
            full_step = {k: v for k, v in full[step].items() if not k.startswith("val/")}
            assert got[step] == full_step, step
        else:
            assert got[step] == full[step], step
    assert sorted(got) == sorted(full)
    assert got[12] == full[12]


def test_heartbeats_name_the_ranks_behind_the_reporting_one():
    from torch.distributed import HashStore

    store = HashStore()
    ranks = [faults.Heartbeats(store, rank, 3) for rank in range(3)]
    for rank in ranks:
        rank.beat(5, "starting the step")
    ranks[0].beat(5, "starting validation")
    ranks[2].beat(5, "starting validation")
    assert ranks[0].silent_ranks() == "not answering: rank 1 (last seen at step 5, starting the step)"
    ranks[1].beat(5, "starting validation")
    assert ranks[0].silent_ranks() == "every rank had reached this point (one is stuck inside it)"
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    failure = faults.collective_failure(timeout, step=5, doing="validating", timeout_s=5, heartbeats=ranks[0], rank=0)
    assert isinstance(failure, faults.CollectiveTimeout) and " at step 5 while validating; every rank had" in str(
        failure
    )
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:60545")
    assert isinstance(
        faults.collective_failure(gone, step=5, doing="x", timeout_s=5, heartbeats=None, rank=1), faults.PeerLost
    )
    assert faults.collective_failure(ValueError("x"), step=5, doing="x", timeout_s=5, heartbeats=None, rank=0) is None


def test_a_stop_signal_to_the_ranks_alone_ends_the_job_though_torchrun_may_restart_them(
    tmp_path, tiny_model_dir, demo_data_dir
):
    """SIGTERM to both ranks (torchrun itself not signalled, as when a scheduler or an operator signals the
    workers) at step 12 or later of 24, MAX_RESTARTS=2: the ranks save and the job exits 75; no restart trains on."""
    name = "stop-restarts"
    overrides = ("data.max_samples=48", "trainer.total_epochs=4", "trainer.test_freq=-1", "trainer.save_freq=6")
    process = start_trainer(
        tmp_path, tiny_model_dir, demo_data_dir, *overrides, name=name, extra_env={"MAX_RESTARTS": "2"}
    )
    wait_for_step(process, tmp_path, name, 12)
    for pid in rank_pids(process.pid).values():
        os.kill(pid, signal.SIGTERM)
    code, out, err = finish(process)
    saved = tracked_step(tmp_path, name)
    assert code == faults.EXIT_STOPPED, out[-2000:] + err[-3000:]
    assert 12 <= saved < 24
    assert (tmp_path / "ckpt" / name / f"global_step_{saved}" / checkpoint.STATE_FILE).is_file()
    assert max(logged_steps(tmp_path, name)) <= saved + 2, out[-2000:]
    assert "resumed from" not in out
    assert "ended an earlier attempt" not in out  # the launcher relayed the stop: torchrun restarted nothing
    assert f"stopped by SIGTERM after step {saved} of 24: saved " in out


# ----------------------------------------------------------------------------- a rank dies


def test_killed_rank_restarts_through_torchrun_and_resumes_exactly(
    tmp_path, reference_run, tiny_model_dir, demo_data_dir
):
    _, _, full = reference_run
    name = "restarted"
    process = start_trainer(
        tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name, extra_env={"MAX_RESTARTS": "1"}
    )
    wait_for_step(process, tmp_path, name, 4)
    os.kill(rank_pids(process.pid)[1], signal.SIGKILL)
    code, out, err = finish(process)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "resumed from" in out and "global_step_3" in out
    assert history(tmp_path, name) == full


# ----------------------------------------------------------------------------- a peer hangs


def test_a_hung_peer_times_out_with_one_line_naming_the_step_and_the_silent_rank(
    tmp_path, tiny_model_dir, demo_data_dir
):
    name = "hung"
    flag = tmp_path / "hang-now"
    process = start_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        *REFERENCE,
        *INJECTION,
        "trainer.collective_timeout_s=5",
        name=name,
        extra_env={"BTRM_TEST_HANG_FLAG": str(flag), "BTRM_TEST_HANG_RANK": "1"},
    )
    wait_for_step(process, tmp_path, name, 2)
    hung_at = max(logged_steps(tmp_path, name)) + 1
    flag.touch()
    code, out, err = finish(process)
    assert code == 2, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(
        "error: rank 0: a collective did not complete within trainer.collective_timeout_s=5 s at step "
    )
    step = int(errors[0].split(" at step ")[1].split()[0])
    assert hung_at <= step <= hung_at + 1
    # rank 1 stopped while fetching its next pairs: for the step (its last beat: the previous step's start
    # or validation) or for validation (its last beat: this step's start)
    assert "; not answering: rank 1 (last seen at step " in errors[0]
    assert "rank 0 (" not in errors[0]
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- a save fails


def test_full_disk_on_one_rank_during_a_save_loses_nothing_and_the_rerun_resumes_exactly(
    tmp_path, reference_run, tiny_model_dir, demo_data_dir
):
    """The save path lies under a directory whose name says "timeout" (an nccl-timeout-study experiment): the
    line names the failed save and nothing else (issue 27: it used to be read as a hung collective)."""
    _, _, full = reference_run
    name = "full-disk"
    tmp_path = tmp_path / "nccl-timeout-study"
    tmp_path.mkdir()
    root = tmp_path / "ckpt" / name
    failing = {"BTRM_TEST_FULL_DISK": "global_step_6/", "BTRM_TEST_FULL_DISK_RANK": "1"}
    result, _ = run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        *REFERENCE,
        *INJECTION,
        name=name,
        extra_env=failing,
        expect_success=False,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: saving {root}/global_step_6 failed: {root}/global_step_6/model_world_size_2_rank_1.pt: "
        f"No space left on device (ENOSPC); nothing of it counts as a checkpoint, the latest complete checkpoint "
        f"is still {root}/global_step_3 and a rerun resumes from it. Free space or restore write permission there, then rerun"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not any(word in errors[0] for word in ("collective", "peer", "heartbeat", "answering"))
    assert tracked_step(tmp_path, name) == 3
    assert not (root / "global_step_6" / checkpoint.STATE_FILE).exists()
    assert checkpoint.latest_complete(root) == root / "global_step_3"

    second, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *REFERENCE, name=name)
    assert "resumed from" in second.stdout and "global_step_3" in second.stdout
    assert history(tmp_path, name) == full


def failing(monkeypatch, target, attribute, pattern, error):
    original = getattr(target, attribute)

    def fail(*args, **kwargs):
        path = str(args[1] if attribute in ("save", "replace") else args[0])
        if pattern in path:
            raise error(path)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, fail)


def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def read_only(path):
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def torch_write_failure(path):
    return RuntimeError(
        "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
    )


def safetensors_full(path):
    """What safetensors (the HF export: transformers' save_pretrained) raises on a full disk: not an OSError."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    ("target", "attribute", "pattern", "error", "named"),
    [
        (
            torch,
            "save",
            "model_world_size_1_rank_0.pt",
            enospc,
            "model_world_size_1_rank_0.pt: No space left on device (ENOSPC)",
        ),
        (torch, "save", "model_world_size_1_rank_0.pt", torch_write_failure, "write failed (torch.save"),
        (torch, "save", "model_world_size_1_rank_0.pt", safetensors_full, "No space left on device (ENOSPC)"),
        (torch, "save", "data.pt", enospc, "No space left on device (ENOSPC)"),
        (os, "replace", checkpoint.STATE_FILE, read_only, "bt_state.json: Permission denied (EACCES)"),
        (
            os,
            "replace",
            checkpoint.TRACKER_FILE,
            read_only,
            "latest_checkpointed_iteration.txt: Permission denied (EACCES)",
        ),
    ],
    ids=[
        "shard-enospc",
        "shard-torch-writer",
        "export-safetensors-enospc",
        "data-state-enospc",
        "completeness-mark-eacces",
        "tracker-eacces",
    ],
)
def test_a_failed_write_anywhere_in_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    one_rank_group, tmp_path, monkeypatch, target, attribute, pattern, error, named
):
    from test_checkpointer import save_step

    model = torch.nn.Linear(4, 1)
    save_step(model, tmp_path, 3)
    failing(monkeypatch, target, attribute, pattern, error)
    with pytest.raises(faults.CheckpointSaveError) as raised:
        save_step(model, tmp_path, 6)
    message = str(raised.value)
    assert message.startswith(f"saving {tmp_path}/global_step_6 failed: ") and named in message
    assert f"the latest complete checkpoint is still {tmp_path}/global_step_3" in message
    monkeypatch.undo()
    assert (tmp_path / checkpoint.TRACKER_FILE).read_text() == "3"
    directory, state = checkpoint.find_resume_checkpoint(
        tmp_path, mode="auto", resume_from_path=None, world_size=1, load_contents=["model"]
    )
    assert directory == tmp_path / "global_step_3" and state["step"] == 3
    assert not list(tmp_path.glob("**/*.tmp*"))  # no temp file left behind


# ----------------------------------------------------------------------------- classification by type (issue 27)


def test_our_own_errors_are_never_collective_failures_whatever_their_text(tmp_path):
    """A failed save under a directory named for a timeout study, or whose OS message names a broken pipe or a
    reset connection, is a failed save; only torch's own distributed errors are read as collective failures."""
    from bt_trainer import TrainingDiverged

    study = tmp_path / "nccl-timeout-study" / "global_step_20"
    latest = tmp_path / "nccl-timeout-study" / "global_step_10"
    full = faults.save_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(study / "x.pt")), study, latest)
    pipe = faults.save_failure(OSError(errno.EPIPE, os.strerror(errno.EPIPE), str(study / "x.pt")), study, latest)
    reset = faults.save_failure(OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)), study, latest)
    ours = [
        full,
        pipe,
        reset,
        checkpoint.CheckpointError(f"{study}: timed out reading the tracker; Broken pipe"),
        TrainingDiverged("weights are not finite at step 20; Watchdog caught collective operation timeout"),
    ]
    for error in ours:
        assert isinstance(error, RuntimeError)  # fit() catches RuntimeError: the type decides, not the text
        failure = faults.collective_failure(error, step=20, doing="saving", timeout_s=1800, heartbeats=None, rank=0)
        assert failure is None, (error, failure)
    watchdog = torch.distributed.DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL")
    failure = faults.collective_failure(watchdog, step=20, doing="x", timeout_s=9, heartbeats=None, rank=0)
    assert isinstance(failure, faults.CollectiveTimeout)
    gloo_gone = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:26507: Connection reset by peer")
    failure = faults.collective_failure(gloo_gone, step=20, doing="x", timeout_s=9, heartbeats=None, rank=1)
    assert isinstance(failure, faults.PeerLost)


def test_naming_the_silent_ranks_never_waits_for_a_heartbeat_that_was_never_written():
    """A rank that hangs before its first heartbeat of an attempt has no key in the store: on a TCPStore a get
    of it would block until the store's timeout (here 60 s) and then say nothing useful."""
    from datetime import timedelta

    from conftest import free_port

    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=60))
    reporting = faults.Heartbeats(store, 0, 3)
    faults.Heartbeats(store, 2, 3).beat(7, "starting the step")
    reporting.beat(7, "starting the step")
    reporting.beat(7, "starting validation")
    started = time.monotonic()
    who = reporting.silent_ranks()
    assert time.monotonic() - started < 10
    assert who == (
        "not answering: rank 1 (no heartbeat yet in this attempt), rank 2 (last seen at step 7, starting the step)"
    )


# ----------------------------------------------------------------------------- a stop is final (issue 27)


def test_stop_after_a_signal_exits_75_only_when_every_rank_says_it_saved(tmp_path, monkeypatch, capsys):
    """torchrun raises SignalException once it has forwarded a stop signal and the ranks have ended (or were
    killed at its shutdown timeout). The launch's status comes from what each rank reported
    (<BTRM_OUTCOME_DIR>/rank-<RANK>.json, written by the rank as it exits), not from the signal alone."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def ending_with(records):
        def run(args):
            directory = os.environ.get("BTRM_OUTCOME_DIR")
            for rank, record in records.items():
                if directory:
                    Path(directory, f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "attempt": 0, **record}))
            raise SignalException("got SIGTERM", sigval=signal.SIGTERM)

        return run

    argv = ["--nproc_per_node=2", "bt_trainer.py"]
    monkeypatch.setattr(torchrun, "run", ending_with({0: {"exit": 75}, 1: {"exit": 75}}))
    assert launcher.launch(argv) == faults.EXIT_STOPPED and capsys.readouterr().err == ""

    saving_failed = (
        "error: saving /x/global_step_6 failed: /x/global_step_6/a.pt: No space left on device (ENOSPC); ..."
    )
    monkeypatch.setattr(torchrun, "run", ending_with({0: {"exit": 3}, 1: {"exit": 2, "line": saving_failed}}))
    assert launcher.launch(argv) == launcher.EXIT_REPORTED
    assert capsys.readouterr().err == saving_failed + "\n"  # rank 0 did not report it: the launcher says it

    monkeypatch.setattr(torchrun, "run", ending_with({0: {"exit": 75}, 1: {"exit": None}}))
    assert launcher.launch(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.startswith("error: stopped by SIGTERM, but rank 1 ended without saying it saved") and "killed" in err
    assert not [key for key in os.environ if key == "BTRM_OUTCOME_DIR"]  # the launch's own, removed after it


def test_a_rank_restarted_after_a_stop_exits_75_at_once_and_records_how_each_rank_ended(tmp_path, monkeypatch):
    """The backstop when torchrun restarts the ranks anyway (the relay could not signal it): the restarted
    rank does not train on. And each rank's record says how it ended (RankOutcome)."""
    monkeypatch.setenv("BTRM_OUTCOME_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with faults.RankOutcome():  # a first attempt that finishes: 0
        pass
    assert json.loads((tmp_path / "rank-1.json").read_text()) == {"rank": 1, "attempt": 0, "exit": 0}
    monkeypatch.setattr(faults, "RELAY_WAIT_S", 0.2)
    with pytest.raises(SystemExit), faults.RankOutcome():
        faults.announce_stop(["SIGTERM", "SIGINT"])
        raise SystemExit(faults.EXIT_STOPPED)
    assert json.loads((tmp_path / "rank-1.json").read_text())["exit"] == faults.EXIT_STOPPED
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trained = []
    with pytest.raises(SystemExit) as exited, faults.RankOutcome():
        trained.append(True)
    assert exited.value.code == faults.EXIT_STOPPED and not trained
    assert json.loads((tmp_path / "rank-1.json").read_text()) == {"rank": 1, "attempt": 1, "exit": 75}


def test_the_launcher_relays_a_stop_the_ranks_alone_received_to_torchrun_once(monkeypatch):
    """StopRelay signals this process (torchrun's agent) with one of the ranks' stop signals that torchrun
    handles, never SIGINT, and not at all when this process was signalled itself."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with faults.StopRelay(["SIGINT", "SIGTERM", "SIGUSR1"], lambda: False) as relay:
            monkeypatch.setenv("RANK", "0")
            faults.announce_stop(["SIGINT", "SIGUSR1"])  # SIGINT first in trainer.stop_signals: skipped
            deadline = time.monotonic() + 10
            while not (relay.directory / faults.STOP_RELAYED).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert received == [signal.SIGUSR1] and relay.relayed == signal.SIGUSR1
        with faults.StopRelay(["SIGTERM", "SIGUSR1"], lambda: True) as relay:
            faults.announce_stop(["SIGUSR1"])
            deadline = time.monotonic() + 10
            while not (relay.directory / faults.STOP_RELAYED).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert received == [signal.SIGUSR1] and relay.relayed is None  # torchrun was signalled already
        assert not relay.directory.exists() and "BTRM_OUTCOME_DIR" not in os.environ
    finally:
        signal.signal(signal.SIGUSR1, previous)
