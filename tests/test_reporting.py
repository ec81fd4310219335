"""btrm.reporting: the start-up summary, console lines, the history file and the trackers."""

import re

from btrm import pair_dataset, reporting


def test_startup_summary_is_aligned_and_complete():
    text = reporting.format_startup_summary(
        reporting.StartupFacts(
            device="cpu",
            backend="gloo",
            world_size=2,
            nodes=1,
            model_path="demo/tiny-qwen3",
            model_class="Qwen3ForTokenClassification",
            parameters=32_762_000_000,
            trainable_parameters=32_761_999_000,
            compute_dtype="bf16",
            master_dtype="fp32",
            frozen_dtype=None,
            attention="sdpa",
            layout="shared",
            train_pairs=6766,
            val_pairs=352,
            val_groups="domain (4), language (12, 3 pooled as other)",
            mean_tokens=1130.4,
            max_tokens=4096,
            max_length=4096,
            truncated_pairs=12,
            dropped_tokens=3456,
            truncation="left",
            steps_per_epoch=26,
            epochs=3,
            total_steps=78,
            last_step=2,
            train_batch_size=256,
            micro_batch="micro-batches of <= 8,192 tokens",
            resume="fresh start",
            output_dir="checkpoints/run",
        )
    )
    lines = text.splitlines()
    value_columns = {re.match(r"\S+(?: \S+)*\s+", line).end() for line in lines}
    assert 10 <= len(lines) <= 14 and len(value_columns) == 1
    for expected in (
        "cpu (gloo), 2 ranks on 1 node",
        "32.8 B (32.8 B trainable)",
        "6,766 pairs",
        "352 pairs, metrics by domain (4), language (12, 3 pooled as other)",
        "1,130 mean, 4,096 max",
        "12 pairs, 3,456 tokens dropped",
        "26 steps/epoch x 3 epochs = 78 steps, stopping at step 2",
        "256 pairs/step",
        "fresh start",
        "checkpoints/run",
    ):
        assert expected in text, expected
    pairs = [
        pair_dataset.TokenizedPair(chosen=[1] * 10, rejected=[1] * 4),
        pair_dataset.TokenizedPair(chosen=[1] * 6, rejected=[1] * 20),
    ]
    index = pair_dataset.group_index([{"domain": "a", "language": "x"}, {"domain": "b"}], ["domain", "language"], 12)
    assert reporting.describe_groups(index) == "domain (2), language (1)" and reporting.describe_groups(None) == ""
    assert reporting.conversation_token_stats(pairs) == (10.0, 20) and reporting.conversation_token_stats([]) == (
        0.0,
        0,
    )
