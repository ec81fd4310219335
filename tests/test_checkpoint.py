"""checkpoint.py: completeness, resume selection, retention order and loading without pickled code."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from btrm import checkpoint
from btrm.checkpoint import CheckpointError

CONTENTS = ["model", "optimizer", "extra"]


def make_checkpoint(root: Path, step: int, world_size: int = 2, complete: bool = True) -> Path:
    directory = root / f"global_step_{step}"
    directory.mkdir(parents=True)
    for name in checkpoint.shard_files(world_size, CONTENTS):
        torch.save({"step": torch.tensor(step)}, directory / name)
    torch.save({"batches_yielded": step}, directory / "data.pt")
    if complete:
        checkpoint.mark_complete(
            directory,
            step=step,
            world_size=world_size,
            save_contents=CONTENTS,
            trainer_state={"skipped_steps": 0, "consecutive_skipped_steps": 0},
        )
    return directory


def shards_only(root: Path, step: int, world_size: int = 2) -> Path:
    """A step directory as verl's manager leaves it: every rank's shards, nothing of the trainer's yet."""
    directory = root / f"global_step_{step}"
    directory.mkdir(parents=True)
    for name in checkpoint.shard_files(world_size, CONTENTS):
        torch.save({"step": torch.tensor(step)}, directory / name)
    return directory


def resume(root, **overrides):
    kwargs = {"mode": "auto", "resume_from_path": None, "world_size": 2, "load_contents": CONTENTS, **overrides}
    return checkpoint.find_resume_checkpoint(root, **kwargs)


def test_shard_file_names_are_verls():
    assert checkpoint.shard_files(2, ["model", "extra"]) == [
        "model_world_size_2_rank_0.pt",
        "model_world_size_2_rank_1.pt",
        "extra_state_world_size_2_rank_0.pt",
        "extra_state_world_size_2_rank_1.pt",
    ]


def test_mark_complete_records_sizes_and_refuses_missing_files(tmp_path):
    directory = make_checkpoint(tmp_path, 4, complete=False)
    (directory / "optim_world_size_2_rank_1.pt").unlink()
    with pytest.raises(CheckpointError, match="optim_world_size_2_rank_1.pt"):
        checkpoint.mark_complete(directory, step=4, world_size=2, save_contents=CONTENTS, trainer_state={})
    assert not (directory / "bt_state.json").exists()
    directory = make_checkpoint(tmp_path, 8)
    state = json.loads((directory / "bt_state.json").read_text())
    assert state["files"]["data.pt"] == (directory / "data.pt").stat().st_size and state["step"] == 8


def test_fresh_directory_starts_from_scratch(tmp_path):
    assert resume(tmp_path / "nothing-here") is None
    assert resume(tmp_path) is None
    make_checkpoint(tmp_path, 4)
    assert resume(tmp_path, mode="disable") is None


def test_tracked_complete_checkpoint_is_resumed(tmp_path):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8)
    checkpoint.write_tracker(tmp_path, 4)  # the tracker, not the highest number, decides
    directory, state = resume(tmp_path)
    assert directory == tmp_path / "global_step_4" and state["step"] == 4


def test_missing_tracker_with_checkpoints_present_stops_and_names_the_one_to_use(tmp_path):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8)
    make_checkpoint(tmp_path, 12, complete=False)
    with pytest.raises(
        CheckpointError, match=r"latest_checkpointed_iteration.txt: missing.*resume_from_path=.*global_step_8$"
    ):
        resume(tmp_path)


def test_garbage_tracker_stops_with_the_file_named(tmp_path):
    make_checkpoint(tmp_path, 4)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt: holds 'abc'.*global_step_4"):
        resume(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "data.pt").unlink(), r"global_step_8/data.pt: missing"),
        (lambda d: (d / "bt_state.json").unlink(), r"global_step_8: incomplete checkpoint"),
        (
            lambda d: (d / "model_world_size_2_rank_1.pt").write_bytes(b"trunc"),
            r"model_world_size_2_rank_1.pt: 5 bytes, \d+ when saved",
        ),
        (lambda d: (d / "bt_state.json").write_text("{"), r"bt_state.json: unreadable"),
    ],
)
def test_damaged_tracked_checkpoint_stops_and_points_to_the_previous_one(tmp_path, damage, message):
    make_checkpoint(tmp_path, 4)
    damage(make_checkpoint(tmp_path, 8))
    checkpoint.write_tracker(tmp_path, 8)
    with pytest.raises(CheckpointError, match=message) as error:
        resume(tmp_path)
    assert str(error.value).endswith(f"resume_from_path={tmp_path / 'global_step_4'}")


def test_other_world_size_is_refused(tmp_path):
    make_checkpoint(tmp_path, 4, world_size=2)
    checkpoint.write_tracker(tmp_path, 4)
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 4"):
        resume(tmp_path, world_size=4)


def test_explicit_resume_path_is_validated(tmp_path):
    make_checkpoint(tmp_path, 4)
    directory, _ = resume(tmp_path, mode="resume_path", resume_from_path=str(tmp_path / "global_step_4"))
    assert directory == tmp_path / "global_step_4"
    with pytest.raises(CheckpointError, match="global_step_9: no such checkpoint"):
        resume(tmp_path, resume_from_path=str(tmp_path / "global_step_9"))


def test_retention_keeps_the_newest_complete_and_clears_cut_off_work(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5, complete=False)  # a save that was cut off
    (tmp_path / ".removing-global_step_1").mkdir()  # a removal that was cut off
    removed = checkpoint.remove_old_checkpoints(tmp_path, keep=2, newest_step=6)
    assert sorted(p.name for p in removed) == ["global_step_2", "global_step_5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_4", "global_step_6"]
    assert checkpoint.remove_old_checkpoints(tmp_path, keep=None, newest_step=6) == []
    checkpoint.remove_old_checkpoints(tmp_path, keep=1, newest_step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_6"]


class Payload:
    """Pickles to a call of os.system: what a tampered checkpoint file could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "data.pt"
    with open(planted, "wb") as out:
        pickle.dump({"state": Payload(marker)}, out)
    with (
        pytest.raises(CheckpointError, match=r"data.pt: cannot be loaded as plain tensors"),
        checkpoint.weights_only_loading(),
    ):
        torch.load(planted, map_location="cpu", weights_only=False)  # verl passes weights_only=False
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored after the block

    # what verl's files legitimately hold loads: tensors and numpy's RNG state
    import numpy as np

    legit = tmp_path / "extra.pt"
    torch.save({"rng": {"numpy": np.random.get_state(), "cpu": torch.get_rng_state()}}, legit)
    with checkpoint.weights_only_loading():
        state = torch.load(legit, weights_only=False)
    assert state["rng"]["numpy"][0] == "MT19937"


# ---- the trainer's state: saved after the shards, restored on resume


def test_saved_trainer_state_is_restored_with_bt_state_json_keys(tmp_path):
    shards_only(tmp_path, 6)
    state = checkpoint.TrainerState(step=6, skipped_steps=3, consecutive_skipped_steps=1, lora={"rank": 8})
    checkpoint.save_trainer_state(
        tmp_path, state, data_state={"batches_yielded": 2}, world_size=2, save_contents=CONTENTS, keep=None
    )
    written = json.loads((tmp_path / "global_step_6" / "bt_state.json").read_text())
    assert written["step"] == 6 and written["trainer"] == {
        "skipped_steps": 3,
        "consecutive_skipped_steps": 1,
        "lora": {"rank": 8},
    }
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert torch.load(tmp_path / "global_step_6" / "data.pt") == {"batches_yielded": 2}
    directory, saved = resume(tmp_path)
    assert checkpoint.restore_trainer_state(directory, saved, lora={"rank": 8}) == state
    with pytest.raises(CheckpointError, match=r"global_step_6: saved with LoRA \{'rank': 8\}, this run has LoRA off"):
        checkpoint.restore_trainer_state(directory, saved, lora=None)


def test_skipped_updates_are_counted_and_a_taken_one_ends_the_streak():
    state = checkpoint.TrainerState()
    for finite in (False, False, True, False):
        state.record_update(finite)
    assert (state.skipped_steps, state.consecutive_skipped_steps) == (3, 1)


def test_a_save_cut_off_before_its_completeness_mark_leaves_the_tracker_on_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    make_checkpoint(tmp_path, 4)
    checkpoint.write_tracker(tmp_path, 4)
    shards_only(tmp_path, 8)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while marking complete")

    monkeypatch.setattr(checkpoint, "mark_complete", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_trainer_state(
            tmp_path, checkpoint.TrainerState(step=8), data_state={}, world_size=2, save_contents=CONTENTS, keep=1
        )
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (tmp_path / "global_step_4" / "bt_state.json").is_file()  # and retention has not removed it
    directory, _ = resume(tmp_path)
    assert directory == tmp_path / "global_step_4"
