#!/usr/bin/env python3
"""Generate the bundled demo data: SYNTHETIC preference pairs in HelpSteer2's preference schema.

    python demo/make_demo_data.py            # rewrites demo/helpsteer2_demo.jsonl.gz (byte-identical)

Nothing here comes from HelpSteer2. Each response is a few sentences, each either helpful
(specific, on-task) or unhelpful (dismissive, vague); the better response has more helpful
sentences, and |preference_strength| is the difference, except for 10% of pairs whose label is
flipped (annotator noise, so the best reachable accuracy is about 0.9). A tiny model can learn that in minutes
on CPU, which is all the demo needs: it proves the pipeline, not a reward model worth using.
Single- and multi-turn prompts (in HelpSteer2's `<extra_id_1>` format), every strength from -3
to 3 and both splits appear.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "helpsteer2_demo.jsonl.gz"
SEED = 20241124
N_ROWS = {"train": 1400, "val": 200}
SENTENCES_PER_RESPONSE = 4
LABEL_NOISE = 0.1  # share of pairs whose label is flipped: the best reachable accuracy is about 0.9

TASKS = [
    "cook rice",
    "learn python",
    "fix a flat tyre",
    "write a cover letter",
    "plant tomatoes",
    "train for a marathon",
    "save money each month",
    "clean a cast iron pan",
    "study for an exam",
    "set up a home network",
    "paint a bedroom",
    "bake bread",
    "prepare for an interview",
    "reduce stress",
    "back up my photos",
    "start a podcast",
]
HELPFUL = [
    "First, gather what you need so that {task} goes smoothly.",
    "A good plan is to break the work into small steps and do one step each day.",
    "Measure carefully and check the result after each step.",
    "Here is a concrete example that shows exactly how to {task}.",
    "Set aside about thirty minutes and follow the steps in order.",
    "If something goes wrong, go back one step and compare with the instructions.",
    "Many people find it helps to write down a short checklist first.",
    "Finally, review what worked well so the next attempt is even easier.",
    "Start with the simplest version and add detail once that works.",
    "Ask a friend to check your work, because a second pair of eyes catches mistakes.",
]
UNHELPFUL = [
    "I do not really know anything about that.",
    "Just search for it yourself.",
    "That is a boring question and not worth the effort.",
    "Whatever you do will probably be fine, or maybe not.",
    "It depends, so there is no point in giving an answer.",
    "Honestly, why would anyone want to {task}?",
    "Someone else can probably explain it, not me.",
    "There are many opinions and all of them are confusing.",
]
FOLLOW_UPS = [
    "Thanks. Can you say more about how to {task}?",
    "What should I do first?",
    "Is there a faster way?",
    "Could you give me a clearer answer?",
]
OPENERS = [
    "How do I {task}?",
    "Can you explain how to {task}?",
    "What is the best way to {task}?",
    "I want to {task}. Any advice?",
]


def make_response(rng: random.Random, task: str, n_helpful: int) -> str:
    sentences = rng.sample(HELPFUL, n_helpful) + rng.sample(UNHELPFUL, SENTENCES_PER_RESPONSE - n_helpful)
    rng.shuffle(sentences)
    return " ".join(sentence.format(task=task) for sentence in sentences)


def make_prompt(rng: random.Random, task: str) -> str:
    prompt = rng.choice(OPENERS).format(task=task)
    for _ in range(rng.choice([0, 0, 1, 2])):  # half the prompts are multi-turn
        earlier_answer = make_response(rng, task, rng.randint(0, SENTENCES_PER_RESPONSE))
        follow_up = rng.choice(FOLLOW_UPS).format(task=task)
        prompt += f"\n<extra_id_1>Assistant\n{earlier_answer}\n<extra_id_1>User\n{follow_up}"
    return prompt


def make_row(rng: random.Random, split: str) -> dict:
    task = rng.choice(TASKS)
    strength = rng.randint(-3, 3)
    # strength = helpful(response_2) - helpful(response_1): > 0 means response_2 is better
    low = rng.randint(0, SENTENCES_PER_RESPONSE - abs(strength))
    high = low + abs(strength)
    helpful_1, helpful_2 = (low, high) if strength >= 0 else (high, low)
    if rng.random() < LABEL_NOISE:  # a careless annotator: the label points the wrong way
        strength = -strength
    statement = {0: "about the same", 1: "slightly better", 2: "better", 3: "much better"}[abs(strength)]
    better = "@Response 2" if strength > 0 else "@Response 1"
    return {
        "split": split,
        "prompt": make_prompt(rng, task),
        "response_1": make_response(rng, task, helpful_1),
        "response_2": make_response(rng, task, helpful_2),
        "preference_strength": strength,
        "preference_statement": f"{better} is {statement}." if strength else "Both responses are about the same.",
        "preference_elaboration": "Synthetic data: the preferred response has more helpful sentences.",
        "three_most_similar_preferences": [],
        "all_preferences_unprocessed": [{"strength": strength, "justification": "synthetic"}],
    }


def demo_rows(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng, split) for split, count in N_ROWS.items() for _ in range(count)]


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    """Byte-identical output for identical rows: fixed gzip mtime and no file name in the header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    rows = demo_rows()
    write_jsonl_gz(rows, args.output)
    print(f"wrote {len(rows)} synthetic rows to {args.output}")


if __name__ == "__main__":
    main()
