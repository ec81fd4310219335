"""btrm.checkpointer on Checkpointer objects built by their constructor (one gloo rank for the barriers):
when to save, non-finite weights never saved, resume through verl's own checkpoint manager without running
a pickled payload, the LoRA bookkeeping of the shards and of verl's HF export."""

import os
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from btrm import checkpoint, lora
from btrm.checkpointer import Checkpointer, verl_manager
from btrm.config import CheckpointContents, RunConfig
from btrm.fault_guard import FaultGuard, TrainingDiverged
from btrm.schema import compose_config
from conftest import REPO


def trainer_section(root, **changes):
    """trainer.yaml's trainer section with its checkpoints under `root`."""
    import dataclasses

    section = RunConfig.from_config(compose_config([f"trainer.default_local_dir={root}"])).trainer
    return dataclasses.replace(section, **changes)


def make_checkpointer(
    root, manager, *, model=None, lora_settings=None, base_dtype="bf16", steps_per_epoch=4, **changes
):
    section = trainer_section(root, **changes)
    return Checkpointer(
        section,
        manager,
        model=model,
        model_config=None,
        lora_settings=lora_settings,
        lora_base_dtype=base_dtype,
        base_model="unused",
        trust_remote_code=False,
        dataloader=SimpleNamespace(state_dict=lambda: {"batches_yielded": 3}),
        steps_per_epoch=steps_per_epoch,
        device="cpu",
        rank=0,
        world_size=1,
        guard=FaultGuard(section, heartbeats=None, rank=0),
    )


def saving_checkpointer(model, root) -> Checkpointer:
    """A checkpointer whose manager writes the one rank's model shard, as verl's does."""

    def save_shards(local_path, global_step, max_ckpt_to_keep):
        torch.save(model.state_dict(), f"{local_path}/model_world_size_1_rank_0.pt")

    return make_checkpointer(
        root,
        SimpleNamespace(save_checkpoint=save_shards),
        model=model,
        checkpoint=CheckpointContents(save_contents=("model",), load_contents=("model",)),
        max_ckpt_to_keep=None,
        default_hdfs_dir=None,
    )


def save_step(model, root, step: int) -> None:
    """Save `step` of a trainer state first saved at step 3 (tests/test_faults.py fails writes inside it)."""
    saving_checkpointer(model, root).save(step, checkpoint.TrainerState(step=3))


def test_saves_fall_on_save_freq_and_always_on_the_last_step(tmp_path):
    every_3 = make_checkpointer(tmp_path, None, save_freq=3)
    assert [s for s in range(1, 11) if every_3.should_save(s, last_step=10)] == [3, 6, 9, 10]
    only_last = make_checkpointer(tmp_path, None, save_freq=-1)
    assert [s for s in range(1, 11) if only_last.should_save(s, last_step=10)] == [10]


def test_weights_that_are_not_finite_are_never_saved(one_rank_group, tmp_path):
    model = torch.nn.Linear(4, 1)
    save_step(model, tmp_path, 3)  # finite: a complete checkpoint
    assert (tmp_path / "global_step_3" / "bt_state.json").is_file()
    with torch.no_grad():
        model.weight[0, 2] = float("nan")
    with pytest.raises(
        TrainingDiverged, match=f"weights are not finite at step 6; .* last good checkpoint is {tmp_path}/global_step_3"
    ):
        save_step(model, tmp_path, 6)
    assert not (tmp_path / "global_step_6").exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_a_suspect_state_is_not_saved_and_a_suspect_final_state_stops(one_rank_group, tmp_path, capsys):
    model = torch.nn.Linear(4, 1)
    saver = saving_checkpointer(model, tmp_path)
    saver.save_unless_suspect(checkpoint.TrainerState(step=3), last_step=9)
    suspect = checkpoint.TrainerState(step=6, skipped_steps=2, consecutive_skipped_steps=2)
    saver.save_unless_suspect(suspect, last_step=9)
    assert "not saving at step 6: the last 2 steps had non-finite gradients" in capsys.readouterr().out
    assert not (tmp_path / "global_step_6").exists()
    assert saver.save_before_stop(suspect).startswith("not saved (the last 2 steps had non-finite gradients)")
    with pytest.raises(
        TrainingDiverged, match=f"not saving the final state. Last good checkpoint: {tmp_path}/global_step_3"
    ):
        saver.save_unless_suspect(checkpoint.TrainerState(step=9, consecutive_skipped_steps=1), last_step=9)
    assert saver.save_before_stop(checkpoint.TrainerState(step=7)) == f"saved {tmp_path}/global_step_7"
    assert (tmp_path / checkpoint.TRACKER_FILE).read_text() == "7"


class Payload:
    """Pickles to a call of os.system: what a tampered checkpoint shard could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", [None, "model", "optim"])
def test_resume_loads_shards_as_plain_tensors_and_never_runs_a_planted_payload(one_rank_group, tmp_path, planted):
    """A complete checkpoint (shards, data.pt, bt_state.json, tracker) read by verl's own checkpoint manager."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    directory = tmp_path / "global_step_4"
    directory.mkdir()
    saved_weights = {name: value.clone() for name, value in model.state_dict().items()}
    torch.save(model.state_dict(), directory / "model_world_size_1_rank_0.pt")
    torch.save(optimizer.state_dict(), directory / "optim_world_size_1_rank_0.pt")
    torch.save({}, directory / "data.pt")
    marker = tmp_path / "payload-ran"
    if planted:
        torch.save({"state": Payload(marker)}, directory / f"{planted}_world_size_1_rank_0.pt")
    checkpoint.mark_complete(
        directory,
        step=4,
        world_size=1,
        save_contents=["model", "optimizer"],
        trainer_state={"skipped_steps": 1, "consecutive_skipped_steps": 0, "lora": None},
    )
    checkpoint.write_tracker(tmp_path, 4)

    with torch.no_grad():
        model.weight.zero_()
    contents = CheckpointContents(save_contents=("model", "optimizer"), load_contents=("model", "optimizer"))
    manager = verl_manager(model, optimizer, None, None, contents, uses_lora=False)
    resumer = make_checkpointer(tmp_path, manager, model=model, checkpoint=contents, resume_mode="auto")
    if planted is None:
        state, resumed_from = resumer.resume()
        assert state.step == 4 and state.skipped_steps == 1 and resumed_from == directory
        assert torch.equal(model.weight, saved_weights["weight"])
        return
    with pytest.raises(
        checkpoint.CheckpointError, match=f"{planted}_world_size_1_rank_0.pt: cannot be loaded as plain tensors"
    ):
        resumer.resume()
    assert not marker.exists()


# ---- the LoRA bookkeeping


def lora_checkpointer(lora_settings, base_dtype="bf16", manager=None):
    return make_checkpointer("unused", manager, lora_settings=lora_settings, base_dtype=base_dtype)


def test_lora_description_names_everything_the_shards_depend_on():
    settings = lora.LoraSettings(8, 16.0, ("q_proj", "v_proj"))
    assert lora_checkpointer(settings).lora_description() == {
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],
        "base_dtype": "bf16",
    }
    assert lora_checkpointer(None).lora_description() is None


def test_verls_manager_does_not_write_the_hf_model_under_lora(one_rank_group):
    """verl's export would gather the full state and write peft keys as a plain model; ours replaces it."""
    model = torch.nn.Linear(4, 1)
    contents = CheckpointContents(save_contents=("model", "optimizer", "extra", "hf_model"), load_contents=("model",))
    with_lora = verl_manager(model, None, None, None, contents, uses_lora=True)
    without = verl_manager(model, None, None, None, contents, uses_lora=False)
    assert with_lora.checkpoint_save_contents == ["model", "optimizer", "extra"]
    assert without.checkpoint_save_contents == ["model", "optimizer", "extra", "hf_model"]


@pytest.mark.parametrize(
    "saved, current",
    [
        (None, lora.LoraSettings(8, 16.0, ("q_proj", "v_proj"))),  # full fine-tune checkpoint, LoRA run
        (
            {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj"], "base_dtype": "bf16"},  # other targets
            lora.LoraSettings(8, 16.0, ("q_proj", "v_proj")),
        ),
        (
            {
                "rank": 8,
                "alpha": 16.0,
                "target_modules": ["q_proj", "v_proj"],
                "base_dtype": "fp32",
            },  # other backbone dtype
            lora.LoraSettings(8, 16.0, ("q_proj", "v_proj")),
        ),
    ],
)
def test_resume_refuses_a_checkpoint_with_other_lora_settings(monkeypatch, tmp_path, saved, current):
    monkeypatch.setattr(
        checkpoint, "find_resume_checkpoint", lambda *a, **k: (tmp_path, {"step": 4, "trainer": {"lora": saved}})
    )
    with pytest.raises(checkpoint.CheckpointError, match=f"^{tmp_path}: saved with LoRA"):
        lora_checkpointer(current).resume()


def test_the_checkpoint_contents_view_is_trainer_yamls():
    """The checkpointer reads trainer.checkpoint through the typed view: its values are trainer.yaml's."""
    yaml = OmegaConf.load(REPO / "trainer.yaml")
    contents = trainer_section("x").checkpoint
    assert list(contents.save_contents) == list(yaml.trainer.checkpoint.save_contents)
    assert list(contents.load_contents) == list(yaml.trainer.checkpoint.load_contents)
