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


# ----------------------------------------------------------------------------- HelpSteer3 (--dataset helpsteer3)


def hs3_row(**overrides):
    """One row in HelpSteer3's preference schema (nvidia/HelpSteer3, config preference)."""
    row = {
        "domain": "general",
        "language": "english",
        "context": [{"role": "user", "content": "What is the capital of France?"}],
        "response1": "The capital of France is Paris.",
        "response2": "The capital of France is Berlin.",
        "overall_preference": -2,  # response1 is better
        "individual_preference": [
            {"score": -2, "reasoning": "@Response 1 is correct; @Response 2 names the wrong city."},
            {"score": -3, "reasoning": "Berlin is the capital of Germany."},
        ],
    }
    row.update(overrides)
    return row


def run_hs3(inputs, out, *extra):
    """prepare_helpsteer2.main for HelpSteer3, in-process (the CLI path itself is covered by run_cli above)."""
    return prep.main(["--dataset", "helpsteer3", "--input", *map(str, inputs), "--output-dir", str(out), *extra])


def last_content(conversation_json):
    return json.loads(conversation_json)[-1]["content"]


def test_helpsteer3_hand_made_pair_picks_the_better_response(tmp_path):
    # Paris is right, Berlin wrong: overall_preference -2 says response1 is better, 3 that response2 is.
    rows = [
        hs3_row(),
        hs3_row(
            context=[{"role": "user", "content": "What is 7 * 8?"}],
            response1="7 * 8 = 54.",
            response2="7 * 8 = 56.",
            overall_preference=3,
        ),
    ]
    assert run_hs3([write_jsonl(tmp_path / "train.jsonl", rows)], tmp_path / "out") == 0
    first, second = read_rows(tmp_path / "out" / "train.parquet")
    assert json.loads(first["chosen"]) == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    assert json.loads(first["rejected"]) == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Berlin."},
    ]
    assert (last_content(second["chosen"]), last_content(second["rejected"])) == ("7 * 8 = 56.", "7 * 8 = 54.")
    assert [first["preference_strength"], second["preference_strength"]] == [2, 3]
    assert [(r["domain"], r["language"]) for r in (first, second)] == [("general", "english")] * 2


@pytest.mark.parametrize(
    "preference, chosen, strength",
    [(-3, "ONE", 3), (-2, "ONE", 2), (-1, "ONE", 1), (1, "TWO", 1), (2, "TWO", 2), (3, "TWO", 3)],
)
def test_helpsteer3_sign_convention_for_every_preference(tmp_path, preference, chosen, strength):
    row = hs3_row(overall_preference=preference, response1="ONE", response2="TWO")
    assert run_hs3([write_jsonl(tmp_path / "train.jsonl", [row])], tmp_path / "out") == 0
    [out] = read_rows(tmp_path / "out" / "train.parquet")
    rejected = {"ONE": "TWO", "TWO": "ONE"}[chosen]
    assert (last_content(out["chosen"]), last_content(out["rejected"]), out["preference_strength"]) == (
        chosen,
        rejected,
        strength,
    )


def test_helpsteer3_multi_turn_context_with_a_system_message_is_kept_as_messages(tmp_path):
    context = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "Another one?", "name": "dropped: only role and content are kept"},
    ]
    row = hs3_row(context=context, response1="3.", response2="4.", overall_preference=-1)
    assert run_hs3([write_jsonl(tmp_path / "train.jsonl", [row])], tmp_path / "out") == 0
    [out] = read_rows(tmp_path / "out" / "train.parquet")
    prompt = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "2."},
        {"role": "user", "content": "Another one?"},
    ]
    assert json.loads(out["chosen"]) == prompt + [{"role": "assistant", "content": "3."}]
    assert json.loads(out["rejected"]) == prompt + [{"role": "assistant", "content": "4."}]


def test_helpsteer3_string_context_is_one_user_turn(tmp_path):
    # NVIDIA's NeMo RL HelpSteer3 loader reads a string context as [{"role": "user", "content": context}]
    row = hs3_row(context="What is the capital of France?")
    assert run_hs3([write_jsonl(tmp_path / "train.jsonl", [row])], tmp_path / "out") == 0
    [out] = read_rows(tmp_path / "out" / "train.parquet")
    assert json.loads(out["chosen"])[:-1] == [{"role": "user", "content": "What is the capital of France?"}]


def test_helpsteer3_split_from_the_split_field_else_the_file_name(tmp_path):
    def row(tag, **extra):
        return hs3_row(context=[{"role": "user", "content": tag}], **extra)

    inputs = [
        write_jsonl(tmp_path / "train.jsonl.gz", [row("t1"), row("t2-says-val", split="val")]),
        write_jsonl(tmp_path / "validation.jsonl", [row("v1")]),
        write_jsonl(tmp_path / "VAL_extra.jsonl", [row("v2")]),
        write_jsonl(tmp_path / "test-set.jsonl", [row("v3"), row("t3-says-train", split="train")]),
        write_jsonl(tmp_path / "mixed.jsonl", [row("t4", split="train"), row("v4", split="test")]),
    ]
    pq.write_table(pa.Table.from_pylist([row("v5")]), tmp_path / "validation.parquet")
    inputs.append(tmp_path / "validation.parquet")
    assert run_hs3(inputs, tmp_path / "out") == 0
    first_turn = lambda r: json.loads(r["chosen"])[0]["content"]  # noqa: E731
    assert [first_turn(r) for r in read_rows(tmp_path / "out" / "train.parquet")] == ["t1", "t3-says-train", "t4"]
    assert [first_turn(r) for r in read_rows(tmp_path / "out" / "test.parquet")] == [
        "t2-says-val",
        "v1",
        "v2",
        "v3",
        "v4",
        "v5",
    ]


def test_helpsteer3_file_name_without_a_rule_and_rows_without_split_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "preference.jsonl", [hs3_row()])
    assert run_hs3([src], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {src} line 1: no 'split' field"), err
    assert "train* -> train.parquet; validation*, val*, test* -> test.parquet" in err
    assert not (tmp_path / "out").exists()


# 10 train rows, 4 test rows, hand-counted below: (domain, language, overall_preference, context roles),
# roles s(ystem), u(ser), a(ssistant), each content one character long.
REPORT_ROWS = {
    "train": [
        ("general", "english", -2, "u"),
        ("general", "english", 0, "uau"),  # tie
        ("general", "english", 1, "u"),
        ("stem", "english", 3, "uau"),
        ("stem", "english", -1, "su"),  # one user turn: not multi-turn
        ("code", "python", 2, "u"),
        ("code", "python", 0, "u"),  # tie
        ("code", "javascript_html_css", -3, "uauau"),
        ("multilingual", "chinese", 1, "u"),
        ("multilingual", "korean", -2, "uau"),
    ],
    "test": [
        ("general", "english", 2, "u"),
        ("code", "python", -1, "uau"),
        ("code", "python", 0, "u"),  # tie
        ("multilingual", "chinese", 3, "u"),
    ],
}
ROLE_NAMES = {"s": "system", "u": "user", "a": "assistant"}


def report_row(domain, language, preference, roles):
    context = [{"role": ROLE_NAMES[r], "content": r} for r in roles]
    return hs3_row(domain=domain, language=language, overall_preference=preference, context=context)


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hs3-report")
    return [
        write_jsonl(folder / f"{split}.jsonl", [report_row(*spec) for spec in specs])
        for split, specs in (("train", REPORT_ROWS["train"]), ("validation", REPORT_ROWS["test"]))
    ]


def summary_line(stdout, prefix):
    return next(line for line in stdout.splitlines() if line.startswith(prefix))


def test_helpsteer3_report_counts_ties_multi_turn_and_domains(report_inputs, tmp_path, capsys):
    assert run_hs3(report_inputs, tmp_path / "out") == 0
    out = capsys.readouterr().out
    # train: 10 read, 8 kept, 2 ties, nothing under --min-strength or filtered; 4 of 10 contexts have more
    # than one user turn. Prompt chars [1, 3, 1, 3, 2, 1, 1, 5, 1, 3]: mean 2.1, pstdev sqrt(16.9 / 10) = 1.3;
    # responses "The capital of France is Paris." (31) and "...Berlin." (32): 31.5 +- 0.5.
    assert " ".join(summary_line(out, "train ").split()) == "train 10 8 2 0 0 0 40.0% 2.1 +- 1.3 31.5 +- 0.5"
    # test: 4 read, 3 kept, 1 tie; 1 of 4 multi-turn; prompt chars [1, 3, 1, 1]: 1.5 +- sqrt(3 / 4) = 0.9
    assert " ".join(summary_line(out, "test ").split()) == "test 4 3 1 0 0 0 25.0% 1.5 +- 0.9 31.5 +- 0.5"
    assert summary_line(out, "per domain, kept/read, train:") == (
        "per domain, kept/read, train: code 2/3, general 2/3, multilingual 2/2, stem 2/2"
    )
    assert summary_line(out, "per domain, kept/read, test:") == (
        "per domain, kept/read, test: code 1/2, general 1/1, multilingual 1/1"
    )
    assert [r["domain"] for r in read_rows(tmp_path / "out" / "train.parquet")] == [
        "general",
        "general",
        "stem",
        "stem",
        "code",
        "code",
        "multilingual",
        "multilingual",
    ]
    assert [r["preference_strength"] for r in read_rows(tmp_path / "out" / "test.parquet")] == [2, 1, 3]


def test_helpsteer3_domain_and_language_filters_count_what_they_drop(report_inputs, tmp_path, capsys):
    assert (
        run_hs3(report_inputs, tmp_path / "out", "--domains", "code", "general", "--languages", "python", "english")
        == 0
    )
    captured = capsys.readouterr()
    assert captured.err == ""
    # train: 4 rows not code/general (domain filter), then code/javascript_html_css (language filter),
    # then 2 ties among the 5 left: 3 kept. test: 1 multilingual, 1 tie, 2 kept.
    assert summary_line(captured.out, "train ").split()[1:7] == ["10", "3", "2", "0", "4", "1"]
    assert summary_line(captured.out, "test ").split()[1:7] == ["4", "2", "1", "0", "1", "0"]
    kept = read_rows(tmp_path / "out" / "train.parquet") + read_rows(tmp_path / "out" / "test.parquet")
    assert [(r["domain"], r["language"]) for r in kept] == [
        ("general", "english"),
        ("general", "english"),
        ("code", "python"),
        ("general", "english"),
        ("code", "python"),
    ]


def test_helpsteer3_filter_values_absent_from_the_data_warn_or_refuse(report_inputs, tmp_path, capsys):
    assert run_hs3(report_inputs, tmp_path / "warned", "--domains", "stem", "STEM") == 0
    err = capsys.readouterr().err
    assert err == (
        "warning: --domains STEM: no row has this value; the data has code, general, multilingual, stem\n"
        # issue 28: the split the filter left empty is said too
        "warning: test.parquet: 0 pairs written: --domains / --languages keep none of its 4 validation rows; "
        "training needs validation pairs (VAL_FILE=... another file)\n"
    )
    assert run_hs3(report_inputs, tmp_path / "refused", "--languages", "English", "french") == 1
    err = capsys.readouterr().err
    assert err == (
        "error: --languages English french: no row has this value; "
        "the data has chinese, english, javascript_html_css, korean, python\n"
    )
    # each value exists, but no code row is in english: refused rather than two empty files
    assert run_hs3(report_inputs, tmp_path / "empty", "--domains", "code", "--languages", "english") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --domains / --languages keep no pair") and err.count("\n") == 1, err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "empty").exists()


def test_filters_need_helpsteer3(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [hs2_row()])
    with pytest.raises(SystemExit) as exit_info:
        prep.main(["--input", str(src), "--output-dir", str(tmp_path / "out"), "--domains", "general"])
    assert exit_info.value.code == 2
    assert "--domains and --languages need --dataset helpsteer3" in capsys.readouterr().err


def test_helpsteer3_parquet_input_matches_jsonl_input(tmp_path):
    rows = [
        hs3_row(overall_preference=p, context=[{"role": "user", "content": f"q{p}"}], domain=d)
        for p, d in ((-3, "code"), (1, "stem"), (2, "general"))
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert run_hs3([tmp_path / "train.jsonl"], tmp_path / "a") == 0
    assert run_hs3([tmp_path / "train.parquet"], tmp_path / "b") == 0
    assert read_rows(tmp_path / "a" / "train.parquet") == read_rows(tmp_path / "b" / "train.parquet")
    assert len(read_rows(tmp_path / "a" / "train.parquet")) == 3


def test_helpsteer3_output_is_read_by_the_trainer_with_domain_and_language_columns(report_inputs, tmp_path):
    from omegaconf import OmegaConf

    from btrm import rows

    assert run_hs3(report_inputs, tmp_path / "out") == 0
    files = [str(tmp_path / "out" / "train.parquet"), str(tmp_path / "out" / "test.parquet")]
    for name in files:
        assert pq.read_schema(name).names == ["chosen", "rejected", "preference_strength", "domain", "language"]
    data_config = OmegaConf.load(REPO / "trainer.yaml").data  # the trainer's own data section
    result = rows.read_pair_rows(files, data_config)
    assert [fmt.kind for fmt in result.formats.values()] == ["messages", "messages"]
    assert result.identical_dropped == 0
    # kept pairs in file order (train then test), hand-read from REPORT_ROWS: |overall_preference| of non-ties
    assert [r.preference_strength for r in result.rows] == [2, 1, 3, 1, 2, 3, 1, 2, 2, 1, 3]
    first = result.rows[0]  # general/english, overall_preference -2: response1 is chosen
    assert first.chosen == [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    assert first.rejected[-1] == {"role": "assistant", "content": "The capital of France is Berlin."}


HS3_BAD_CASES = {
    "missing_field": ({"drop": "response2"}, "field 'response2' is missing"),
    "preference_out_of_range": (
        {"overall_preference": -4},
        "field 'overall_preference' is -4; expected an integer in -3..3",
    ),
    "preference_is_string": ({"overall_preference": "1"}, "field 'overall_preference' is '1'"),
    "preference_not_integer": ({"overall_preference": 0.5}, "field 'overall_preference' is 0.5"),
    "empty_response": ({"response1": " "}, "field 'response1' is empty"),
    "domain_not_text": ({"domain": 3}, "field 'domain' is a int; expected a string"),
    "unknown_split": ({"split": "dev"}, "field 'split' is 'dev'"),
    "context_empty_list": ({"context": []}, "field 'context': is []; expected a non-empty list"),
    "context_message_not_object": ({"context": ["hi"]}, "field 'context': message 1 is a str"),
    "context_bad_role": (
        {"context": [{"role": "human", "content": "hi"}]},
        "field 'context': message 1 has role 'human'",
    ),
    "context_empty_content": (
        {
            "context": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "?"},
            ]
        },
        "field 'context': message 2 (assistant) has content ''; expected non-empty text",
    ),
    "context_not_alternating": (
        {"context": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "field 'context': message 2 has role 'user'; expected 'assistant'",
    ),
    "context_starts_with_assistant": (
        {"context": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        "field 'context': message 1 has role 'assistant'; expected 'user'",
    ),
    "context_late_system": (
        {"context": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
        "field 'context': message 2 has role 'system'; expected 'assistant'",
    ),
    "context_ends_on_assistant": (
        {"context": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "field 'context': the last message has role 'assistant'; expected the user turn being answered",
    ),
    "context_only_system": (
        {"context": [{"role": "system", "content": "a"}]},
        "field 'context': the last message has role 'system'",
    ),
    "helpsteer2_row": ({"replace": hs2_row()}, "field 'domain' is missing; these look like HelpSteer2 rows"),
}


@pytest.mark.parametrize("case", sorted(HS3_BAD_CASES))
def test_helpsteer3_bad_row_names_file_line_field_and_writes_nothing(tmp_path, capsys, case):
    change, problem = HS3_BAD_CASES[case]
    bad = change["replace"] if "replace" in change else hs3_row(**{k: v for k, v in change.items() if k != "drop"})
    if "drop" in change:
        del bad[change["drop"]]
    good = write_jsonl(tmp_path / "train.jsonl", [hs3_row()])
    src = write_jsonl(tmp_path / "validation.jsonl", [hs3_row(), bad])  # line 2 is bad
    assert run_hs3([good, src], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {src} line 2: "), err
    assert problem in err, err
    assert not (tmp_path / "out").exists()


def test_helpsteer3_rows_given_as_helpsteer2_say_which_dataset(tmp_path, capsys):
    src = write_jsonl(tmp_path / "train.jsonl", [hs3_row()])
    assert prep.main(["--input", str(src), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {src} line 1: field 'split' is missing; these look like HelpSteer3 rows: pass --dataset helpsteer3\n"
    )


def test_helpsteer3_failure_leaves_existing_outputs_untouched(tmp_path):
    out = tmp_path / "out"
    assert run_hs3([write_jsonl(tmp_path / "train.jsonl", [hs3_row()])], out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl(tmp_path / "validation.jsonl", [hs3_row(), hs3_row(overall_preference=9)])
    assert run_hs3([tmp_path / "train.jsonl", bad], out) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_helpsteer3_hub_loads_the_preference_config_and_routes_its_splits(tmp_path, monkeypatch, capsys):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {
            "train": [hs3_row(), hs3_row(overall_preference=0)],
            "validation": [hs3_row(overall_preference=1, response2="Paris, on the Seine.")],
        }

    monkeypatch.setattr(prep, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert prep.main(["--dataset", "helpsteer3", "--output-dir", str(tmp_path / "out")]) == 0
    assert calls == [(("nvidia/HelpSteer3", "preference"), {})]
    [train] = read_rows(tmp_path / "out" / "train.parquet")
    [test] = read_rows(tmp_path / "out" / "test.parquet")
    assert last_content(train["chosen"]) == "The capital of France is Paris."
    assert last_content(test["chosen"]) == "Paris, on the Seine."
    assert summary_line(capsys.readouterr().out, "train ").split()[1:4] == ["2", "1", "1"]


def test_helpsteer3_hub_bad_row_names_the_split_and_row(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(prep, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: {"train": [hs3_row()], "validation": [hs3_row(), hs3_row(domain="")]}
    )
    assert prep.main(["--dataset", "helpsteer3", "--output-dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        "error: nvidia/HelpSteer3/preference validation row 2: field 'domain' is empty; expected non-empty text\n"
    )


def test_helpsteer3_hub_failure_says_to_pass_input(monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(prep, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prep.main(["--dataset", "helpsteer3", "--output-dir", "/nonexistent/never-written"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not load nvidia/HelpSteer3 (config 'preference') from the Hugging Face hub")
    assert "--input train.jsonl.gz validation.jsonl.gz" in err


# ---- issue 28: empty input and splits that end with zero pairs


def test_an_empty_input_is_refused_and_nothing_is_written(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        src = tmp_path / name
        src.write_text(content)
        result = run_cli(src, tmp_path / "out")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == f"error: --input {src}: no rows; nothing written; pass the preference data file(s)\n"
        assert not (tmp_path / "out").exists()
    # one empty file among several: refused too, naming it
    good = write_jsonl(tmp_path / "good.jsonl", [hs2_row(split="train"), hs2_row(split="val")])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_helpsteer2.py"),
            "--input",
            str(good),
            str(src),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        result.returncode == 1
        and result.stderr == f"error: --input {src}: no rows; nothing written; pass the preference data file(s)\n"
    )
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("split", pa.string())])), empty)
    result = run_cli(empty, tmp_path / "out")
    assert result.returncode == 1 and result.stderr.startswith(f"error: --input {empty}: no rows; nothing written")


def test_a_split_whose_rows_are_all_dropped_is_refused_naming_it(tmp_path):
    rows = [hs2_row(split="train", preference_strength=-2), hs2_row(split="val", preference_strength=0)]
    rows.append(hs2_row(split="val", preference_strength=1, prompt="other"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "test.parquet").write_bytes(b"previous")
    result = run_cli(write_jsonl(tmp_path / "in.jsonl", rows), out, "--min-strength", "2")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "error: test.parquet would hold no pair: all 2 of its rows were dropped (1 tie, 1 under --min-strength 2); "
        "nothing written; lower --min-strength or check the input's validation rows\n"
    )
    assert (out / "test.parquet").read_bytes() == b"previous" and not (out / "train.parquet").exists()


def test_input_with_train_rows_only_says_so_in_one_line_naming_the_split(tmp_path):
    result = run_cli(write_jsonl(tmp_path / "in.jsonl", [hs2_row(split="train")]), tmp_path / "out")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: test.parquet: 0 pairs written: the input has no validation rows; "
        "training needs validation pairs (VAL_FILE=... another file, or add rows with split 'val')"
    ]
    assert (
        len(read_rows(tmp_path / "out" / "test.parquet")) == 0
        and len(read_rows(tmp_path / "out" / "train.parquet")) == 1
    )


def test_helpsteer3_validation_rows_only_warn_about_the_train_split(tmp_path, capsys):
    assert run_hs3([write_jsonl(tmp_path / "validation.jsonl", [hs3_row()])], tmp_path / "out") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: train.parquet: 0 pairs written: the input has no training rows"
    )


def test_a_refused_command_line_is_one_line_without_the_usage_text(tmp_path):
    for extra, line in (
        (["--min-strength", "5"], "--min-strength must be in 1..3 (ties, strength 0, carry no preference); got 5"),
        (["--min-strength", "x"], "argument --min-strength: invalid int value: 'x'"),
        (["--dataset", "hs4"], "argument --dataset: invalid choice: 'hs4' (choose from 'helpsteer2', 'helpsteer3')"),
    ):
        result = run_cli(tmp_path / "in.jsonl", tmp_path / "out", *extra)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == f"error: {line}; prepare_helpsteer2.py --help lists the options\n"


def test_an_empty_hub_dataset_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prep, "_load_from_hub", lambda *args, **kwargs: [])
    assert prep.main(["--output-dir", str(tmp_path / "out"), "--hub-dataset", "someone/empty"]) == 1
    assert (
        capsys.readouterr().err == "error: someone/empty: no rows; nothing written; pass the preference data file(s)\n"
    )
    assert not (tmp_path / "out").exists()
