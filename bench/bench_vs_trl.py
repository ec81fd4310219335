#!/usr/bin/env python3
"""bt-rm against TRL's RewardTrainer on CPU: training pairs per second, each run the way a user runs it.

    .venv/bin/python -m bench.bench_vs_trl                 # both sides: 128 pairs, 8 steps of 16 (a few minutes)
    .venv/bin/python -m bench.bench_vs_trl --skip-trl      # bt-rm only; TRL's figures from its last run of this config
    .venv/bin/python -m bench.bench_vs_trl --btrm-override data.share_prompt=false   # an experiment on bt-rm's side
    .venv/bin/python -m bench.bench_vs_trl --trl-per-device-batch 1   # TRL at its fastest here: one pair per device micro-step
    .venv/bin/python -m bench.bench_vs_trl --dry           # build model, data and both command lines; run nothing

TRL runs from the project's test venv (`bash setup.sh --test`: requirements-test.txt pins trl 1.16.0 next to the
project's torch and transformers, so the two trainers differ only in the trainer); --trl-python picks another
interpreter that has trl.

Both sides train the same model on the same conversations, 2 ranks on CPU (gloo), OMP_NUM_THREADS=1 per rank:
  model  a random-init Qwen3 causal LM (hidden 256, intermediate 768, 4 layers, 4 heads, 2 kv heads, head_dim 64)
         with demo/make_tiny_model.py's byte-level BPE tokenizer and ChatML template, saved to a temp dir. bt-rm puts
         its value head on it; TRL loads AutoModelForSequenceClassification(num_labels=1) from the same directory.
  data   --pairs HelpSteer2-like conversations (lengths drawn as in bench_throughput.py: prompt ~180 +- 220 tokens,
         responses ~370 +- 270, log-normal; a quarter of the prompts multi-turn), written once as a `messages` jsonl
         that both read; each applies the chat template itself. No conversation exceeds max_length, so neither
         bt-rm's truncation nor TRL's length filter touches a pair: both train on every pair.
  steps  16 pairs per optimizer step (bt-rm TRAIN_BATCH_SIZE=16; TRL 8 per device x 2 ranks, no accumulation),
         one epoch (--pairs / 16 steps, or --steps fewer).
  bt-rm  `bash run_bt_rm.sh` with its defaults (it starts 2 CPU processes when no GPU is visible). Given: the model,
         data, batch size, epochs, save path (in the temp dir), a free MASTER_PORT, and the settings that must
         match TRL: LR, MAX_LENGTH, model.enable_gradient_checkpointing. Packing, prompt sharing, the token budget
         and the start-up layout check stay at their defaults: measuring the defaults is the point.
  TRL    torchrun --nproc_per_node 2 of this file's --trl-worker, which does what trl/scripts/reward.py does
         (RewardTrainer from the model path, train, save_model) plus one evaluate(), as bt-rm validates once at
         its last step. RewardConfig's defaults, except what must match: per_device_train_batch_size 8,
         learning_rate, max_length, gradient_checkpointing, bf16 off (fp32, as bt-rm on CPU), use_cpu (what makes
         torchrun's ranks one data-parallel job on CPU: gloo), report_to none.
Matched, and left at both defaults: seed 42, sdpa attention, dataloader_num_workers 0, fp32 weights, AdamW (TRL:
fused). Gradient checkpointing is off on both (--gradient-checkpointing on: on both). Not matched (no effect on
speed): LR schedule (bt-rm cosine with warmup, TRL linear), weight decay, betas, clipping threshold.
Kept as TRL runs by default: DDP with find_unused_parameters=True (transformers' choice when gradient
checkpointing is off: one more pass over the autograd graph a step), its per-step reward metrics gathered over ranks.

Measured:
  pairs/s         pairs trained / training-loop time. bt-rm: the sum of its per-step `train/time(s)` from its history
                  file (trainer.history_file), step 1 including the start-up layout check; TRL: train_runtime (from
                  the start of the loop, after model load and DDP wrapping, to its end).
  steady pairs/s  the same over steps 2..N (bt-rm: their train/time(s); TRL: from the end of step 1 to the end of
                  step N, timed by a callback).
  wall s          the whole command (start-up, data tokenization, model load, training, validation, saving).
  cpu s           CPU time of all the command's processes: less sensitive to other load than the times above.
  tokens/pair     tokens each side computes per pair (padding included, a shared prompt once), and the
                  conversations' real tokens, which must be equal on both sides (the same pairs, tokenized alike).
Prints a table and, last, one JSON line. The machine's other load moves these numbers: compare runs made together.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANKS = 2
PAIRS_PER_RANK = 8
STEP_PAIRS = RANKS * PAIRS_PER_RANK
VAL_PAIRS = 16
MAX_LENGTH = 4096  # bt-rm's default (MAX_LENGTH); TRL's default (1024) would drop the longest pairs, so it is given
LR = 5e-7  # bt-rm's default (LR), given to both so that neither depends on the other's default
SEED = 42  # bt-rm's trainer.seed and TrainingArguments.seed defaults: not passed, checked by the tests
DEFAULT_TRL_RESULT = REPO / "checkpoints" / "bench_vs_trl" / "trl_result.json"  # under a gitignored directory
EXPERIMENT_NAME = "bench_vs_trl"
CPU_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU on both sides, even on a GPU machine


# ---------------------------------------------------------------------------------------------- data and model


def sentence_pool():
    """demo/make_demo_data.py's sentences (HelpSteer2-like prose the demo tokenizer was trained on)."""
    from demo import make_demo_data as demo

    return demo.TASKS, demo.OPENERS + demo.FOLLOW_UPS, demo.HELPFUL, demo.UNHELPFUL


def draw_text(rng: random.Random, target_tokens: int, first: list[str], pool: list[str], task: str, count) -> str:
    """Sentences until the text has at least target_tokens tokens (a sentence's tokens add up: the byte-level
    pre-tokenizer splits at the spaces that join them)."""
    sentences = [rng.choice(first).format(task=task)] if first else []
    tokens = sum(count(s) for s in sentences)
    while tokens < target_tokens:
        sentence = rng.choice(pool).format(task=task)
        sentences.append(sentence)
        tokens += count(sentence)
    return " ".join(sentences)


def make_conversations(tokenizer, n_pairs: int, max_length: int, seed: int) -> list[dict]:
    """`messages` rows {chosen, rejected}: a shared prompt (1-3 user turns) and two different assistant responses,
    lengths in tokens drawn as bench_throughput's; a pair with a conversation over max_length is drawn again, so
    no pair is truncated (bt-rm) or filtered out (TRL)."""
    from bench.bench_throughput import PROMPT_TOKENS, RESPONSE_TOKENS, lognormal

    tasks, questions, helpful, unhelpful = sentence_pool()
    cache: dict[str, int] = {}

    def count(sentence: str) -> int:
        if sentence not in cache:
            cache[sentence] = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        return cache[sentence]

    def length(messages) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True))

    rng = random.Random(seed)
    rows = []
    while len(rows) < n_pairs:
        task = rng.choice(tasks)
        prompt_tokens = max(8, int(lognormal(rng, *PROMPT_TOKENS)))
        response_tokens = [max(4, int(lognormal(rng, *RESPONSE_TOKENS))) for _ in range(2)]
        earlier = rng.choice([0, 0, 0, 0, 0, 0, 1, 2])  # earlier exchanges: a quarter of the prompts multi-turn
        share = max(4, prompt_tokens // (2 * earlier + 1))
        prompt = []
        for _ in range(earlier):
            prompt.append({"role": "user", "content": draw_text(rng, share, questions, helpful, task, count)})
            prompt.append({"role": "assistant", "content": draw_text(rng, share, [], helpful + unhelpful, task, count)})
        prompt.append({"role": "user", "content": draw_text(rng, share, questions, helpful + unhelpful, task, count)})
        # the chosen response is mostly helpful sentences, the rejected one mostly unhelpful: a learnable signal
        good, bad = 3 * helpful + unhelpful, helpful + 3 * unhelpful
        chosen = prompt + [{"role": "assistant", "content": draw_text(rng, response_tokens[0], [], good, task, count)}]
        rejected = prompt + [{"role": "assistant", "content": draw_text(rng, response_tokens[1], [], bad, task, count)}]
        if chosen != rejected and max(length(chosen), length(rejected)) <= max_length:
            rows.append({"chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def model_dims() -> dict[str, int]:
    """bench_throughput's cpu-dense Qwen3 (hidden 256, 4 layers), the model both benches time; the tokenizer sets
    the vocabulary."""
    from bench.bench_throughput import MODEL_CONFIGS

    return {key: value for key, value in MODEL_CONFIGS["cpu-dense"].items() if key != "vocab_size"}


def prepare(workdir: Path, args) -> dict[str, Path]:
    """The model directory and the train / validation files both sides read."""
    from transformers import AutoTokenizer

    from demo.make_tiny_model import build_tiny_model

    model_dir = build_tiny_model(workdir / "model", seed=0, **model_dims(), max_position_embeddings=args.max_length)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = make_conversations(tokenizer, args.pairs, args.max_length, seed=args.data_seed)
    val = make_conversations(tokenizer, VAL_PAIRS, args.max_length, seed=args.data_seed + 1)
    return {
        "model": model_dir,
        "train": write_jsonl(train, workdir / "train.jsonl"),
        "val": write_jsonl(val, workdir / "val.jsonl"),
        "work": workdir,
    }


# -------------------------------------------------------------------------------------------------- commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def btrm_command(paths: dict[str, Path], args, port: int) -> tuple[list[str], dict[str, str]]:
    """`bash run_bt_rm.sh` with the knobs a user must give, the settings that must match TRL, and nothing else."""
    env = {
        "MODEL_PATH": str(paths["model"]),
        "TRAIN_FILE": str(paths["train"]),
        "VAL_FILE": str(paths["val"]),
        "TRAIN_BATCH_SIZE": str(STEP_PAIRS),
        "TOTAL_EPOCHS": "1",
        "SAVE_PATH": str(paths["work"] / "btrm"),
        "EXPERIMENT_NAME": EXPERIMENT_NAME,
        "MASTER_PORT": str(port),
        "LR": repr(args.lr),
        "MAX_LENGTH": str(args.max_length),
        **CPU_ENV,
    }
    overrides = [f"model.enable_gradient_checkpointing={str(args.gradient_checkpointing == 'on').lower()}"]
    if args.steps < args.pairs // STEP_PAIRS:  # stop early (TRL: max_steps); schedules differ anyway, speed does not
        overrides.append(f"trainer.total_training_steps={args.steps}")
    return ["bash", str(REPO / "run_bt_rm.sh"), *overrides, *args.btrm_override], env


def trl_command(paths: dict[str, Path], args, port: int, python: str) -> tuple[list[str], dict[str, str]]:
    """torchrun, 2 ranks, of this file's --trl-worker in the TRL venv."""
    command = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={RANKS}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(Path(__file__).resolve()),
        "--trl-worker",
        "--model",
        str(paths["model"]),
        "--train-file",
        str(paths["train"]),
        "--val-file",
        str(paths["val"]),
        "--output-dir",
        str(paths["work"] / "trl"),
        "--per-device-batch",
        str(args.trl_per_device_batch),
        "--max-steps",
        str(args.steps if args.steps < args.pairs // STEP_PAIRS else -1),
        "--lr",
        repr(args.lr),
        "--max-length",
        str(args.max_length),
        "--gradient-checkpointing",
        args.gradient_checkpointing,
        "--result",
        str(paths["work"] / "trl_worker.json"),
    ]
    return command, dict(CPU_ENV)


def trl_interpreter(args) -> str:
    """--trl-python, else this interpreter (the project's .venv), which must have trl (`bash setup.sh --test`)."""
    if args.trl_python:
        return args.trl_python
    try:
        import trl  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit(f"{sys.executable} has no trl: run `bash setup.sh --test`, or pass --trl-python") from None
    return sys.executable


def run_logged(command: list[str], env: dict[str, str], log: Path, name: str) -> dict[str, float]:
    """Run to completion with output to `log`: the wall time of the whole command and the CPU time of all its
    processes (wall well above cpu / ranks means other load on the machine slowed this run)."""
    print(f"running {name} ... (log: {log})", file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, env={**os.environ, **env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{name} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


# ------------------------------------------------------------------------------------------------- results


def rates(pairs_per_step: list[int], seconds_per_step: list[float]) -> dict:
    """pairs/s over all steps and over steps 2..N (no steady figure from a single step)."""
    loop = sum(seconds_per_step)
    result = {
        "steps": len(seconds_per_step),
        "pairs": sum(pairs_per_step),
        "loop_s": loop,
        "pairs_per_s": sum(pairs_per_step) / loop,
        "first_step_s": seconds_per_step[0],
        "step_s": seconds_per_step,
    }
    if len(seconds_per_step) > 1:
        result["steady_pairs_per_s"] = sum(pairs_per_step[1:]) / sum(seconds_per_step[1:])
    return result


def btrm_from_history(path: Path) -> dict:
    """bt-rm's figures from its history file: one JSON line per logged call, {"step": N, "data": {...}}; training
    lines carry train/time(s) (step 1 includes the start-up layout check). A step logged twice (a resume) counts once,
    the last time."""
    steps: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if "train/time(s)" in record["data"]:
                steps[record["step"]] = record["data"]
    if not steps:
        raise ValueError(f"{path}: no training step logged")
    ordered = [steps[s] for s in sorted(steps)]
    seconds = [d["train/time(s)"] for d in ordered]
    pairs = [round(d["train/pairs_per_s"] * d["train/time(s)"]) for d in ordered]
    computed = sum(d["train/tokens_per_pair"] * p for d, p in zip(ordered, pairs, strict=True))
    real = sum(d["train/real_tokens_per_s"] * d["train/time(s)"] for d in ordered)
    # the conversations' own tokens: real tokens plus what a shared prompt saved
    conversation = sum(
        d["train/real_tokens_per_s"] * d["train/time(s)"] / (1.0 - d["train/prefix_saved_share"]) for d in ordered
    )
    return rates(pairs, seconds) | {
        "tokens_per_pair": computed / sum(pairs),
        "real_token_share": real / computed,
        "conversation_tokens": round(conversation),
    }


def trl_from_worker(result: dict) -> dict:
    """TRL's figures from the worker's JSON: train_runtime for the loop, the callback's step ends for steps 2..N."""
    ends, begin = result["step_ends"], result["train_begin"]
    seconds = [b - a for a, b in zip([begin, *ends[:-1]], ends, strict=True)]
    pairs = [result["train_pairs"] // len(ends)] * len(ends)  # every step the same: no partial last batch
    summary = rates(pairs, seconds)
    # the loop is train_runtime, which also covers what precedes step 1 and follows step N inside train()
    summary["loop_s"] = result["train_runtime"]
    summary["pairs_per_s"] = summary["pairs"] / result["train_runtime"]
    summary["tokens_per_pair"] = result["computed_tokens"] / result["train_pairs"]
    summary["real_token_share"] = result["conversation_tokens"] / result["computed_tokens"]
    summary["conversation_tokens"] = result["conversation_tokens"]
    return summary


def fingerprint(args) -> dict:
    """What TRL's result depends on: --skip-trl reuses a result only when this is unchanged."""
    return {
        "pairs": args.pairs,
        "steps": args.steps,
        "step_pairs": STEP_PAIRS,
        "ranks": RANKS,
        "max_length": args.max_length,
        "lr": args.lr,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trl_per_device_batch": args.trl_per_device_batch,
        "data_seed": args.data_seed,
        "model": model_dims(),
        "val_pairs": VAL_PAIRS,
    }


def table(trl: dict, btrm: dict, trl_version: str) -> str:
    rows = [
        ("pairs/s (whole loop)", "pairs_per_s", "{:.2f}"),
        ("pairs/s (steps 2..N)", "steady_pairs_per_s", "{:.2f}"),
        ("loop s", "loop_s", "{:.1f}"),
        ("first step s", "first_step_s", "{:.2f}"),
        ("wall s (command)", "wall_s", "{:.1f}"),
        ("cpu s (command)", "cpu_s", "{:.1f}"),
        ("tokens/pair computed", "tokens_per_pair", "{:.0f}"),
        ("real token share", "real_token_share", "{:.3f}"),
        ("conversation tokens", "conversation_tokens", "{:d}"),
        ("pairs x steps", None, None),
    ]
    lines = [f"{'':<22} {'TRL ' + trl_version:>12} {'bt-rm':>12} {'bt-rm/TRL':>10}"]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{side['pairs']} x {side['steps']}" for side in (trl, btrm)]
            lines.append(f"{label:<22} {cells[0]:>12} {cells[1]:>12}")
            continue
        a, b = trl.get(key), btrm.get(key)
        ratio = ""
        if key in ("pairs_per_s", "steady_pairs_per_s") and a and b:
            ratio = f"{b / a:.2f}x"
        elif key in ("loop_s", "wall_s", "cpu_s") and a and b:
            ratio = f"{a / b:.2f}x"  # time: TRL's over bt-rm's, so > 1 means bt-rm is faster here too
        cells = [fmt.format(v) if v is not None else "n/a" for v in (a, b)]
        lines.append(f"{label:<22} {cells[0]:>12} {cells[1]:>12} {ratio:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- TRL worker


def run_trl_worker(ns) -> None:
    """One rank of the TRL run (under torchrun): trl/scripts/reward.py's steps and a step timer; rank 0 writes JSON."""
    import torch
    import torch.distributed as dist
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    config = trl_config(ns)
    # the tokenizer TRL would load itself; passed in so the collator below can be built with its pad token
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    collator = counting_collator(tokenizer.pad_token_id, config.pad_to_multiple_of)
    dataset = load_dataset("json", data_files={"train": ns.train_file, "test": ns.val_file})
    timer = StepTimes()
    trainer = RewardTrainer(
        model=ns.model,
        args=config,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[timer],
    )
    output = trainer.train()
    computed = torch.tensor([collator.computed_tokens], dtype=torch.float64)
    dist.all_reduce(computed)
    conversation_tokens = trainer._total_train_tokens  # real tokens, already gathered over ranks by RewardTrainer
    trainer.save_model(config.output_dir)
    trainer.evaluate()  # once, as bt-rm validates at its last step
    if trainer.accelerator.is_main_process:
        result = {
            "train_runtime": output.metrics["train_runtime"],
            "train_begin": timer.begin,
            "step_ends": timer.ends,
            "train_pairs": len(timer.ends)
            * config.per_device_train_batch_size
            * config.gradient_accumulation_steps
            * trainer.accelerator.num_processes,
            "train_dataset_pairs": len(trainer.train_dataset),
            "computed_tokens": int(computed.item()),
            "conversation_tokens": int(conversation_tokens),
            "train_loss": output.metrics.get("train_loss"),
            "ranks": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": dist.get_backend(),
            "torch_threads": torch.get_num_threads(),
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        Path(ns.result).write_text(json.dumps(result), encoding="utf-8")


def trl_config(ns):
    """RewardConfig: TRL's defaults except what must match bt-rm (batch, lr, max_length, checkpointing, fp32)."""
    from trl import RewardConfig

    return RewardConfig(
        output_dir=ns.output_dir,
        per_device_train_batch_size=ns.per_device_batch,
        per_device_eval_batch_size=ns.per_device_batch,
        # the same pairs a step either way: 8 per device at once (TRL's default shape), or one at a time
        gradient_accumulation_steps=PAIRS_PER_RANK // ns.per_device_batch,
        num_train_epochs=1,
        max_steps=ns.max_steps,
        learning_rate=ns.lr,
        max_length=ns.max_length,
        gradient_checkpointing=ns.gradient_checkpointing == "on",
        bf16=False,  # TRL's default is bf16 (autocast); bt-rm computes in fp32 on CPU
        # without it each torchrun rank trains alone on all the data (transformers' parallel_mode stays
        # NOT_PARALLEL on CPU); with it accelerate sets up MULTI_CPU data parallelism over gloo
        use_cpu=True,
        report_to="none",  # no tracker, as bt-rm's default console logger
    )


def counting_collator(pad_token_id: int, pad_to_multiple_of: int | None):
    """TRL's own collator (as RewardTrainer builds it by default), counting the tokens it hands the model."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class Counting(DataCollatorForPreference):
        def __init__(self):
            super().__init__(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
            self.computed_tokens = 0  # padding included

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            self.computed_tokens += batch["input_ids"].numel()
            return batch

    return Counting()


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128, help="training pairs (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default and at most: pairs / 16)")
    parser.add_argument("--skip-trl", action="store_true", help="reuse TRL's result of the last run with this config")
    parser.add_argument("--trl-result", type=Path, default=DEFAULT_TRL_RESULT, help="where TRL's result is kept")
    parser.add_argument("--trl-python", default=None, help="interpreter with trl (default: this one, the .venv)")
    parser.add_argument(
        "--btrm-override",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for bt-rm only, e.g. data.share_prompt=false",
    )
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off", help="on both sides")
    parser.add_argument(
        "--trl-per-device-batch",
        type=int,
        choices=(PAIRS_PER_RANK, 1),
        default=PAIRS_PER_RANK,
        help=f"TRL's pairs per device micro-step: {PAIRS_PER_RANK} (its default shape, padded to the longest) or 1 "
        f"(its fastest here: no padding, {PAIRS_PER_RANK} accumulation steps); 16 pairs a step either way",
    )
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (model, data, logs, checkpoints)")
    parser.add_argument("--dry", action="store_true", help="build model, data and both commands, print them, stop")
    worker = parser.add_argument_group("TRL worker (internal: one rank under torchrun)")
    worker.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--model", "--train-file", "--val-file", "--output-dir", "--result"):
        worker.add_argument(flag, help=argparse.SUPPRESS)
    worker.add_argument("--per-device-batch", type=int, default=PAIRS_PER_RANK, help=argparse.SUPPRESS)
    worker.add_argument("--max-steps", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.trl_worker:
        if args.pairs <= 0 or args.pairs % STEP_PAIRS:
            parser.error(f"--pairs must be a positive multiple of {STEP_PAIRS} (pairs per step)")
        epoch_steps = args.pairs // STEP_PAIRS
        args.steps = epoch_steps if args.steps is None else args.steps
        if not 1 <= args.steps <= epoch_steps:
            parser.error(f"--steps must be 1..{epoch_steps} (one epoch of {args.pairs} pairs)")
    return args


def load_saved_trl(args) -> tuple[dict, dict]:
    """--skip-trl: TRL's figures from the last run, only if it ran this configuration."""
    if not args.trl_result.exists():
        raise SystemExit(f"--skip-trl: no saved TRL result at {args.trl_result}; run once without --skip-trl")
    saved = json.loads(args.trl_result.read_text(encoding="utf-8"))
    if saved["config"] != json.loads(json.dumps(fingerprint(args))):
        raise SystemExit(
            f"--skip-trl: {args.trl_result} was measured with {saved['config']}, not {fingerprint(args)}; run TRL again"
        )
    return saved["trl"], saved["worker"]


def run_trl(command: list[str], env: dict[str, str], workdir: Path, args) -> tuple[dict, dict]:
    times = run_logged(command, env, workdir / "trl.log", "TRL (torchrun, 2 ranks)")
    worker = json.loads((workdir / "trl_worker.json").read_text(encoding="utf-8"))
    if worker["ranks"] != RANKS or worker["train_pairs"] != args.steps * STEP_PAIRS:
        raise SystemExit(f"TRL did not train {args.steps} steps of {STEP_PAIRS} pairs on {RANKS} ranks: {worker}")
    trl = trl_from_worker(worker) | times
    args.trl_result.parent.mkdir(parents=True, exist_ok=True)
    saved = {"config": fingerprint(args), "trl": trl, "worker": worker}
    args.trl_result.write_text(json.dumps(saved), encoding="utf-8")
    return trl, worker


def summarize(trl: dict, btrm: dict, worker: dict, args) -> dict:
    """The last JSON line: each side's figures, the ratios, versions and the configuration."""
    same_data = btrm["pairs"] == trl["pairs"] and btrm["conversation_tokens"] == trl["conversation_tokens"]
    return {
        "trl": trl,
        "btrm": btrm,
        "speedup": btrm["pairs_per_s"] / trl["pairs_per_s"],
        "steady_speedup": btrm["steady_pairs_per_s"] / trl["steady_pairs_per_s"] if args.steps > 1 else None,
        "wall_speedup": trl["wall_s"] / btrm["wall_s"],
        "same_data": same_data,
        "trl_version": worker["trl_version"],
        "transformers_version": worker["transformers_version"],
        "torch_version": worker["torch_version"],
        "trl_reused": args.skip_trl,
        "btrm_overrides": args.btrm_override,
        **fingerprint(args),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.trl_worker:
        run_trl_worker(args)
        return None
    saved_trl = load_saved_trl(args) if args.skip_trl and not args.dry else None  # fail before building anything
    trl_python = trl_interpreter(args) if saved_trl is None and not args.dry else (args.trl_python or sys.executable)
    temporary = args.workdir is None  # only a directory this run made is removed at the end
    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-trl-")) if temporary else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = prepare(workdir, args)
        btrm_cmd, btrm_env = btrm_command(paths, args, free_port())
        trl_cmd, trl_env = trl_command(paths, args, free_port(), trl_python)
        if args.dry:
            for name, (command, env) in (("trl", (trl_cmd, trl_env)), ("btrm", (btrm_cmd, btrm_env))):
                print(f"{name}: " + " ".join(f"{k}={v!r}" for k, v in env.items()) + " " + " ".join(command))
            summary = {"dry": True, "workdir": str(workdir), "trl_command": trl_cmd, "btrm_command": btrm_cmd}
            summary |= {"btrm_env": btrm_env, "trl_env": trl_env, **fingerprint(args)}
            print(json.dumps(summary))
            return summary
        trl, worker = saved_trl or run_trl(trl_cmd, trl_env, workdir, args)
        times = run_logged(btrm_cmd, btrm_env, workdir / "btrm.log", "bt-rm (bash run_bt_rm.sh)")
        btrm = btrm_from_history(paths["work"] / "btrm" / EXPERIMENT_NAME / "metrics.jsonl") | times
        summary = summarize(trl, btrm, worker, args)
        if not summary["same_data"]:
            print(
                f"warning: the sides trained different data: TRL {trl['pairs']} pairs, {trl['conversation_tokens']} "
                f"tokens; bt-rm {btrm['pairs']} pairs, {btrm['conversation_tokens']} tokens",
                file=sys.stderr,
            )
        print(table(trl, btrm, worker["trl_version"]))
        print(json.dumps(summary))
        return summary
    finally:
        if temporary and not (args.keep or args.dry):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
