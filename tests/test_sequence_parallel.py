"""sequence_parallel.py: Ulysses sequence parallelism over the packed and shared layouts, exact.

- 2 gloo ranks in one sequence-parallel group (spawned here) score the same pairs split over the two
  ranks; the reference is the same model run padded by transformers' own sdpa in each process (no
  segment attention, no parallelism): rewards, the BT loss written out, and every parameter's
  gradient (the group's gradients summed) must match. Cases: single- and multi-turn, shared
  prefixes, a row whose split falls inside a pair, a row padded to a multiple of 2, GQA (4 query /
  2 kv heads) and 1 kv head (N > kv heads: repeated).
- end to end through run_bt_rm.sh: 2 ranks with N=2 against 2 ranks with N=1, shared and packed
  layouts; 4 ranks with N=2 (2 data-parallel groups) against 4 ranks with N=1: train/loss step for
  step and the final val/loss.
- the refusals: N not dividing the ranks or the heads, the padded layout with N > 1.
"""

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_attention import CASES, case_pairs

from btrm import attention, batching, schema, sequence_parallel
from btrm.pair_dataset import TokenizedPair
from conftest import REFERENCE, free_port, history, read_metrics, run_trainer

SIZE = 2


def reference_model(model_dir, kv_heads):
    """fp32 value-head model with sdpa (never switched to segment attention), seeded: the same on every rank."""
    from transformers import AutoConfig, Qwen3ForTokenClassification

    config = AutoConfig.from_pretrained(model_dir, num_key_value_heads=kv_heads, num_labels=1)
    config.classifier_dropout = 0.0
    torch.manual_seed(5)
    model = Qwen3ForTokenClassification._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards of order 1, so differences are visible
    torch.nn.init.zeros_(model.score.bias)
    model.score.bias.requires_grad_(False)
    return model.train()


def bt_loss_and_grads(model, rewards, n):
    loss = -F.logsigmoid(rewards[:n] - rewards[n:]).mean()  # the BT loss, written out
    loss.backward()
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def row_split_inside_a_pair(batch, size):
    """Whether some pair's tokens lie on both sides of a boundary between two ranks' shards."""
    length = batch["input_ids"].shape[1]
    shard = -(-length // size)
    boundaries = [shard * r for r in range(1, size)]
    ends = [0, *(batch["reward_index"].view(2, -1).max(0).values + 1).tolist()]  # pair i ends at its rejected's end
    return any(
        min(ends[i], ends[i + 1]) < b < max(ends[i], ends[i + 1]) for b in boundaries for i in range(len(ends) - 1)
    )


def spawned_rank(rank, port, model_dir, tokenizer_dir, out_dir):
    """One of the 2 ranks: for every (kv heads, layout, case) the group's rewards, loss and gradients vs padded."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE)
    sp = sequence_parallel.SequenceParallel.create(SIZE, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cases = {case: case_pairs(tokenizer, case) for case in CASES[:4]}
    cases["all_in_one_row"] = [p for pairs in cases.values() for p in pairs]
    results = []
    for kv_heads in (2, 1):
        reference = reference_model(model_dir, kv_heads)
        candidate = copy.deepcopy(reference)
        attention.enable_segment_attention(candidate)
        for layout in ("packed", "shared"):
            for case, pairs in cases.items():
                n = len(pairs)
                reference.zero_grad()
                expected = batching.compute_rewards(reference, batching.collate_pairs(pairs, tokenizer.pad_token_id))
                expected_loss, expected_grads = bt_loss_and_grads(reference, expected, n)
                candidate.zero_grad()
                batch = batching.collate_pairs(pairs, tokenizer.pad_token_id, layout)
                rewards = sequence_parallel.compute_rewards(candidate, batch, sp)
                loss, grads = bt_loss_and_grads(candidate, rewards, n)
                for grad in grads.values():  # the group's gradient: its ranks' parts added
                    dist.all_reduce(grad, group=sp.group)
                results.append(
                    {
                        "kv_heads": kv_heads,
                        "layout": layout,
                        "case": case,
                        "row_length": batch["input_ids"].shape[1],
                        "split_inside_a_pair": row_split_inside_a_pair(batch, SIZE),
                        "shared_prefix": any(p.shared_prefix > 0 for p in pairs),
                        "reward_difference": float((rewards - expected).detach().abs().max()),
                        "reward_scale": float(expected.detach().abs().max()),
                        "loss": float(loss.detach()),
                        "expected_loss": float(expected_loss.detach()),
                        "same_parameters": sorted(grads) == sorted(expected_grads),
                        "grad_difference": max(
                            float(
                                (grads[k] - expected_grads[k]).abs().max()
                                / expected_grads[k].abs().max().clamp_min(1e-12)
                            )
                            for k in expected_grads
                        ),
                    }
                )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("sp-unit")
    mp.start_processes(
        spawned_rank,
        args=(free_port(), str(tiny_model_dir), str(tiny_model_dir), str(out)),
        nprocs=SIZE,
        start_method="spawn",
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(SIZE)]


def test_the_cases_cover_what_the_split_must_survive(two_rank_results):
    results = two_rank_results[0]
    assert {r["kv_heads"] for r in results} == {1, 2}  # GQA 4/2, and N=2 > 1 kv head
    assert any(r["split_inside_a_pair"] for r in results)
    assert any(r["row_length"] % SIZE for r in results)  # padded to a multiple of N
    assert any(r["shared_prefix"] and r["layout"] == "shared" for r in results)
    assert {r["case"] for r in results} >= {"single_turn", "multi_turn"}


@pytest.mark.parametrize("rank", range(SIZE))
def test_rewards_loss_and_grads_equal_one_rank_padded(two_rank_results, rank):
    results = two_rank_results[rank]
    print(  # for docs/long-context.md (pytest -s)
        f"rank {rank}, {len(results)} cases: max reward difference {max(r['reward_difference'] for r in results):.2g}, "
        f"loss {max(abs(r['loss'] - r['expected_loss']) for r in results):.2g}, "
        f"gradient (relative to its largest entry) {max(r['grad_difference'] for r in results):.2g}"
    )
    for r in two_rank_results[rank]:
        where = f"rank {rank} {r['layout']} {r['case']} kv_heads={r['kv_heads']}"
        assert r["reward_difference"] <= 1e-5 * max(1.0, r["reward_scale"]), where
        assert r["loss"] == pytest.approx(r["expected_loss"], abs=1e-5), where
        assert r["same_parameters"], where
        assert r["grad_difference"] <= 1e-4, where


# ----------------------------------------------------------------------------- refusals


def base_values(**changes):
    values = schema.trainer_yaml_knobs()
    values.update(changes)
    return values


def test_sequence_parallel_size_must_divide_the_ranks():
    values = {**base_values(), "ulysses_sequence_parallel_size": 3}
    with pytest.raises(schema.PreflightError, match=r"^ulysses_sequence_parallel_size=3 does not divide the 4 ranks"):
        schema.check_combinations(values, world_size=4)
    schema.check_combinations({**values, "ulysses_sequence_parallel_size": 2}, world_size=4)


def test_padded_layout_with_sequence_parallelism_is_refused():
    values = {**base_values(), "ulysses_sequence_parallel_size": 2, "use_remove_padding": False}
    with pytest.raises(schema.PreflightError, match=r"^ulysses_sequence_parallel_size=2 with use_remove_padding=false"):
        schema.check_combinations(values, world_size=2)


def test_heads_must_divide_over_the_group():
    class Config:
        num_attention_heads = 6

    sequence_parallel.check_heads(Config, 3)
    with pytest.raises(
        ValueError, match=r"^ulysses_sequence_parallel_size=4 does not divide the model's 6 attention heads"
    ):
        sequence_parallel.check_heads(Config, 4)


def test_shard_batch_pads_and_points_rewards_into_the_shard():
    """Written out for a 5-token row over 2 ranks: shards [0, 3) and [3, 6), position 5 padding."""
    batch = batching.collate_pairs([TokenizedPair([1, 2, 3], [1, 4])], pad_token_id=0, layout="packed")
    shards = [
        sequence_parallel.shard_batch(batch, sequence_parallel.SequenceParallel(2, rank, None, 0, 1)) for rank in (0, 1)
    ]
    assert [s["input_ids"].tolist() for s, _ in shards] == [[[1, 2, 3]], [[1, 4, 0]]]
    assert [s["position_ids"].tolist() for s, _ in shards] == [[[0, 1, 2]], [[0, 1, 0]]]
    assert [owned.tolist() for _, owned in shards] == [[True, False], [False, True]]
    assert shards[0][0]["reward_index"][0] == 2 and shards[1][0]["reward_index"][1] == 1


# ----------------------------------------------------------------------------- end to end: run_bt_rm.sh with N=2 follows N=1

FIRST_STEPS = 5  # train/loss compared on these; val/loss at every validated step
RUNS = {
    # shared layout, token budget (CPU auto): conftest's reference run (2 epochs of 6 steps, validated and saved
    # every 3), so its N=1 twin is shared with the other test files; micro-batches dealt per data-parallel group
    "shared": REFERENCE,
    # packed layout, fixed-size micro-batches (no budget): a group's ranks share the pairs they sampled
    "packed": (
        f"data.max_samples={8 * FIRST_STEPS}",
        "trainer.test_freq=-1",
        "trainer.checkpoint.save_contents=[model]",
        "data.share_prompt=false",
        "data.max_tokens_per_micro_batch=null",
    ),
    # 4 ranks: 5 steps of the shared layout, one validation
    "shared-4": (
        f"data.max_samples={8 * FIRST_STEPS}",
        "trainer.test_freq=-1",
        "trainer.checkpoint.save_contents=[model]",
    ),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, demo_data_dir, request):
    """run_bt_rm.sh runs, launched once each: launched(ranks, run, N) -> (stdout, history, metrics with timings)."""
    runs = {}

    def launch(nproc: int, run: str, size: int):
        key = (nproc, run, size)
        if key == (2, "shared", 1):
            _, result, reference_history = request.getfixturevalue("reference_run")
            return result.stdout, reference_history, None
        if key not in runs:
            name = f"sp{size}-{run}-{nproc}ranks"
            tmp_path = tmp_path_factory.mktemp(name)
            result, metrics_file = run_trainer(
                tmp_path,
                tiny_model_dir,
                demo_data_dir,
                *RUNS[run],
                f"ulysses_sequence_parallel_size={size}",
                nproc=nproc,
                name=name,
            )
            runs[key] = (result.stdout, history(tmp_path, name), read_metrics(metrics_file))
        return runs[key]

    return launch


def assert_follows(candidate_run, reference_run):
    (_, candidate, candidate_timed), (_, reference, _) = candidate_run, reference_run
    assert sorted(candidate) == sorted(reference)
    train = [step for step in sorted(reference) if "train/loss" in reference[step]][:FIRST_STEPS]
    validated = [step for step in sorted(reference) if "val/loss" in reference[step]]
    assert len(train) == FIRST_STEPS and validated
    for step in train:  # printed for docs/long-context.md (pytest -s)
        print(f"step {step}: train/loss {candidate[step]['train/loss']!r} vs {reference[step]['train/loss']!r}")
        assert candidate[step]["train/loss"] == pytest.approx(reference[step]["train/loss"], rel=1e-5), step
    for step in validated:
        print(f"step {step}: val/loss {candidate[step]['val/loss']!r} vs {reference[step]['val/loss']!r}")
        assert candidate[step]["val/loss"] == pytest.approx(reference[step]["val/loss"], rel=1e-5, abs=1e-5), step
        assert candidate[step]["val/accuracy"] == reference[step]["val/accuracy"], step
        # a group's validation pairs are counted once: the per-strength counts are the validation set's
        counts = {key: value for key, value in reference[step].items() if key.startswith("val/pairs_")}
        assert counts and {key: candidate[step][key] for key in counts} == counts, step
    # a group's pairs are counted once: pairs/s x seconds is the step's 8 pairs
    counted = [
        round(m["train/pairs_per_s"] * m["train/time(s)"]) for m in candidate_timed.values() if "train/loss" in m
    ]
    assert counted == [8] * len(counted)


@pytest.mark.parametrize("run", ["shared", "packed"])
def test_two_ranks_in_one_group_follow_two_ranks_without_parallelism(launched, run):
    reference, candidate = launched(2, run, 1), launched(2, run, SIZE)
    assert "sequence parallelism: each packed row split over 2 ranks" in candidate[0]
    assert "sequence parallelism" not in reference[0]
    assert_follows(candidate, reference)


def test_four_ranks_in_two_groups_follow_four_ranks_without_parallelism(launched):
    candidate = launched(4, "shared-4", SIZE)
    assert "2 data-parallel groups" in candidate[0]
    assert_follows(candidate, launched(4, "shared-4", 1))


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ("ulysses_sequence_parallel_size=2", "use_remove_padding=false"),
            "error: ulysses_sequence_parallel_size=2 with use_remove_padding=false: sequence parallelism splits packed rows only",
        ),
        (("ulysses_sequence_parallel_size=4",), "error: ulysses_sequence_parallel_size=4 does not divide the 2 ranks"),
    ],
)
def test_launcher_refuses_in_one_line_before_starting_ranks(tmp_path, tiny_model_dir, demo_data_dir, overrides, line):
    result, _ = run_trainer(tmp_path, tiny_model_dir, demo_data_dir, *overrides, expect_success=False)
    assert result.returncode == 2
    output = (result.stdout + result.stderr).strip().splitlines()
    assert any(text.startswith(line) for text in output), output[-5:]
    assert "Traceback" not in result.stderr
