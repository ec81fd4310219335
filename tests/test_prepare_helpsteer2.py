"""prepare_helpsteer2.py: schema conversion, direction, filtering, split routing, bad input, determinism."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_helpsteer2 as prep

REPO = Path(__file__).resolve().parent.parent


def hs2_row(**overrides):
    row = {
        "split": "train",
        "prompt": "What is 2+2?",
        "response_1": "It is 4.",
        "response_2": "Five.",
        "preference_strength": -2,
        "preference_statement": "@Response 1 is better.",
        "preference_elaboration": "Correct.",
        "three_most_similar_preferences": [],
        "all_preferences_unprocessed": [],
    }
    row.update(overrides)
    return row


def write_jsonl(path: Path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_cli(input_path: Path, output_dir: Path, *extra):
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_helpsteer2.py"),
            "--input",
            str(input_path),
            "--output-dir",
            str(output_dir),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def read_rows(path: Path):
    return pq.read_table(path).to_pylist()


def test_single_turn_row_becomes_exact_messages(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [hs2_row()])
    assert run_cli(src, tmp_path / "out").returncode == 0
    [row] = read_rows(tmp_path / "out" / "train.parquet")
    assert json.loads(row["chosen"]) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    assert json.loads(row["rejected"]) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Five."},
    ]
    assert row["preference_strength"] == -2


def test_multi_turn_prompt_becomes_alternating_messages(tmp_path):
    prompt = "Hi there\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nTell me a joke"
    src = write_jsonl(tmp_path / "in.jsonl", [hs2_row(prompt=prompt, preference_strength=3)])
    assert run_cli(src, tmp_path / "out").returncode == 0
    [row] = read_rows(tmp_path / "out" / "train.parquet")
    prompt_messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert json.loads(row["chosen"]) == prompt_messages + [{"role": "assistant", "content": "Five."}]
    assert json.loads(row["rejected"]) == prompt_messages + [{"role": "assistant", "content": "It is 4."}]


@pytest.mark.parametrize("strength", [-3, -2, -1, 1, 2, 3])
def test_direction_for_every_strength(tmp_path, strength):
    src = write_jsonl(
        tmp_path / "in.jsonl", [hs2_row(preference_strength=strength, response_1="ONE", response_2="TWO")]
    )
    assert run_cli(src, tmp_path / "out").returncode == 0
    [row] = read_rows(tmp_path / "out" / "train.parquet")
    chosen = json.loads(row["chosen"])[-1]["content"]
    rejected = json.loads(row["rejected"])[-1]["content"]
    assert (chosen, rejected) == (("TWO", "ONE") if strength > 0 else ("ONE", "TWO"))
    assert row["preference_strength"] == strength


def test_ties_dropped_and_min_strength_filters(tmp_path):
    rows = [hs2_row(preference_strength=s, response_1=f"r{s}") for s in range(-3, 4)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_cli(src, tmp_path / "out1")
    assert result.returncode == 0
    assert sorted(r["preference_strength"] for r in read_rows(tmp_path / "out1" / "train.parquet")) == [
        -3,
        -2,
        -1,
        1,
        2,
        3,
    ]
    result = run_cli(src, tmp_path / "out2", "--min-strength", "2")
    assert result.returncode == 0
    assert sorted(r["preference_strength"] for r in read_rows(tmp_path / "out2" / "train.parquet")) == [-3, -2, 2, 3]
    # the summary reports 7 read, 4 kept, 1 tie, 2 below threshold for train
    train_line = next(line for line in result.stdout.splitlines() if line.startswith("train"))
    assert train_line.split()[1:5] == ["7", "4", "1", "2"]


def test_split_routing(tmp_path):
    rows = [
        hs2_row(split="train", prompt="a"),
        hs2_row(split="val", prompt="b"),
        hs2_row(split="validation", prompt="c"),
    ]
    src = write_jsonl(tmp_path / "in.jsonl.gz", rows)
    assert run_cli(src, tmp_path / "out").returncode == 0
    first_prompt = lambda r: json.loads(r["chosen"])[0]["content"]  # noqa: E731
    assert [first_prompt(r) for r in read_rows(tmp_path / "out" / "train.parquet")] == ["a"]
    assert [first_prompt(r) for r in read_rows(tmp_path / "out" / "test.parquet")] == ["b", "c"]


def test_parquet_input_matches_jsonl_input(tmp_path):
    rows = [hs2_row(preference_strength=s, prompt=f"p{s}") for s in (-3, 1, 2)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    assert run_cli(tmp_path / "in.jsonl", tmp_path / "a").returncode == 0
    assert run_cli(tmp_path / "in.parquet", tmp_path / "b").returncode == 0
    assert read_rows(tmp_path / "a" / "train.parquet") == read_rows(tmp_path / "b" / "train.parquet")


BAD_CASES = {
    "malformed_json": ([], ['{"split": "train", "prompt": '], "line 2", "malformed JSON"),
    "missing_field": (
        [{k: v for k, v in hs2_row().items() if k != "response_2"}],
        [],
        "line 2",
        "'response_2' is missing",
    ),
    "strength_not_integer": (
        [hs2_row(preference_strength=1.5)],
        [],
        "line 2",
        "'preference_strength' is 1.5; expected an integer in -3..3",
    ),
    "strength_out_of_range": ([hs2_row(preference_strength=4)], [], "line 2", "'preference_strength' is 4"),
    "strength_is_string": ([hs2_row(preference_strength="2")], [], "line 2", "'preference_strength' is '2'"),
    "unknown_split": ([hs2_row(split="dev")], [], "line 2", "'split' is 'dev'"),
    "empty_prompt": ([hs2_row(prompt="  ")], [], "line 2", "'prompt' is empty"),
    "empty_response": ([hs2_row(response_2="")], [], "line 2", "'response_2' is empty"),
    "empty_turn_in_prompt": (
        [hs2_row(prompt="hi\n<extra_id_1>Assistant\n\n<extra_id_1>User\nmore")],
        [],
        "line 2",
        "turn 2 (assistant) is empty",
    ),
    "non_alternating_turns": ([hs2_row(prompt="hi\n<extra_id_1>User\nagain")], [], "line 2", "expected alternating"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, case):
    bad_rows, raw_lines, where, problem = BAD_CASES[case]
    src = write_jsonl(tmp_path / "in.jsonl", [hs2_row()] + bad_rows, raw_lines)  # line 1 is good
    out = tmp_path / "out"
    result = run_cli(src, out)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert message.count("\n") == 0, message  # one message, no traceback
    assert f"{src} {where}" in message and problem in message, message
    assert not out.exists() or list(out.iterdir()) == []


def test_failure_leaves_existing_outputs_untouched(tmp_path):
    out = tmp_path / "out"
    assert run_cli(write_jsonl(tmp_path / "good.jsonl", [hs2_row()]), out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [hs2_row(), hs2_row(), hs2_row(split="dev")])
    assert run_cli(bad, out).returncode != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either


def test_deterministic_byte_identical_output(tmp_path):
    src = REPO / "demo" / "helpsteer2_demo.jsonl.gz"
    assert run_cli(src, tmp_path / "a").returncode == 0
    assert run_cli(src, tmp_path / "b").returncode == 0
    for name in ("train.parquet", "test.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_hub_failure_says_to_pass_input(monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prep.main(["--output-dir", "/nonexistent/never-written"]) == 1
    err = capsys.readouterr().err
    assert "nvidia/HelpSteer2" in err and "--input" in err


def test_prompt_to_messages_three_user_turns():
    prompt = "a\n<extra_id_1>Assistant\nb\n<extra_id_1>User\nc\n<extra_id_1>Assistant\nd\n<extra_id_1>User\ne"
    assert [m["role"] for m in prep.prompt_to_messages(prompt)] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in prep.prompt_to_messages(prompt)] == list("abcde")


def test_a_failed_second_write_keeps_both_old_outputs_byte_identical_and_no_temp_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(write_jsonl(tmp_path / "good.jsonl", [hs2_row(), hs2_row(split="val")]), out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["test.parquet", "train.parquet"]

    real_write_table = pq.write_table
    calls = []

    def write_then_fail(table, where, *args, **kwargs):  # train.parquet is written in full, test.parquet fails midway
        calls.append(where)
        if len(calls) == 2:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError("No space left on device")
        return real_write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    new_rows = write_jsonl(tmp_path / "new.jsonl", [hs2_row(prompt="new"), hs2_row(split="val", prompt="new")])
    assert prep.main(["--input", str(new_rows), "--output-dir", str(out)]) == 1
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # both old files intact, no temp files


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    import os

    previous = os.umask(mask)
    try:
        assert (
            prep.main(
                ["--input", str(write_jsonl(tmp_path / "in.jsonl", [hs2_row()])), "--output-dir", str(tmp_path / "out")]
            )
            == 0
        )
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {
        "train.parquet": mode,
        "test.parquet": mode,
    }


def test_bad_paths_are_one_line(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    src = write_jsonl(tmp_path / "in.jsonl", [hs2_row()])
    cases = [
        (
            ["--input", str(tmp_path / "dir")],
            f"error: --input {tmp_path / 'dir'} is a directory; pass the data file itself",
        ),
        (["--input", str(tmp_path / "nope.jsonl")], f"error: --input {tmp_path / 'nope.jsonl'}: no such file"),
        (
            ["--input", str(src), "--output-dir", str(tmp_path / "file")],
            f"error: --output-dir {tmp_path / 'file'} is a file",
        ),
    ]
    for argv, message in cases:
        if "--output-dir" not in argv:
            argv = argv + ["--output-dir", str(tmp_path / "out")]
        assert prep.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
