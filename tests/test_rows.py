"""btrm.rows: data paths, the pair formats every reader shares, the rows read from them and their messages."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from btrm import rows
from btrm.rows import DataError


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def data_config(**overrides):
    """Every data.* key PairDataset and rows read, with trainer.yaml's values but truncation=error."""
    base = {
        "chosen_key": "chosen",
        "rejected_key": "rejected",
        "prompt_key": "prompt",
        "format": "auto",
        "drop_identical_pairs": True,
        "group_columns": ["domain", "language", "subset"],
        "max_length": 4096,
        "truncation": "error",
        "apply_chat_template_kwargs": {},
    }
    return OmegaConf.create({**base, **overrides})


def write_parquet(path: Path, records) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_jsonl(path: Path, records, blank_lines_after_first: int = 0) -> Path:
    lines = [json.dumps(r) for r in records]
    lines[1:1] = [""] * blank_lines_after_first
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- data paths


def pair_record(prompt="Q", good="good", bad="bad", strength=2):
    return {
        "chosen": json.dumps(conv(prompt, good)),
        "rejected": json.dumps(conv(prompt, bad)),
        "preference_strength": strength,
    }


def test_check_data_files_refuses_paths_that_would_train_on_the_wrong_data(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", [pair_record()])
    val = write_parquet(tmp_path / "test.parquet", [pair_record(prompt="other")])
    assert rows.check_data_files(str(train), [str(val)]) == ([str(train)], [str(val)])

    cases = {
        "directory": (
            (str(tmp_path), [str(val)]),
            f"data.train_files: {tmp_path} is a directory; pass the data files themselves",
        ),
        "missing": (
            (str(tmp_path / "nope.parquet"), None),
            f"data.train_files: {tmp_path / 'nope.parquet'}: no such file",
        ),
        # the same file under another spelling is still the same file
        "both": (([str(train)], [str(tmp_path / "sub" / ".." / "train.parquet")]), "is given as both training"),
        "twice": (([str(train), f"{tmp_path}/./train.parquet"], [str(val)]), "is listed twice"),
        "suffix": ((str(tmp_path / "train.csv"), None), "unsupported file type"),
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "train.csv").write_text("chosen,rejected\n")
    for name, ((train_arg, val_arg), message) in cases.items():
        with pytest.raises(DataError) as error:
            rows.check_data_files(train_arg, val_arg)
        assert message in str(error.value), name
        assert "\n" not in str(error.value), name


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "blank_jsonl"])
def test_an_empty_data_file_is_refused_naming_it(tmp_path, kind):
    train = write_parquet(tmp_path / "train.parquet", [pair_record()])
    if kind == "parquet":
        empty = tmp_path / "val.parquet"
        pq.write_table(pa.Table.from_pylist([pair_record()]).slice(0, 0), empty)  # the schema, no rows
    else:
        empty = tmp_path / "val.jsonl"
        empty.write_text("" if kind == "jsonl" else "\n  \n")
    with pytest.raises(DataError, match=rf"data.val_files: {empty}: the file is empty \(no rows\)"):
        rows.check_data_files([str(train)], [str(empty)])
    with pytest.raises(DataError, match=rf"{empty}"):
        rows.read_pair_rows([str(empty)], data_config())


def test_count_shared_pairs_counts_validation_pairs_also_in_training():
    class Pair:
        def __init__(self, chosen, rejected):
            self.chosen, self.rejected = chosen, rejected

    train = [Pair([1, 2], [3]), Pair([4], [5, 6]), Pair([7], [8])]
    val = [
        Pair([1, 2], [3]),  # shared
        Pair([3], [1, 2]),  # swapped: not the same pair
        Pair([4], [5, 6]),  # shared
        Pair([4], [5, 6]),  # shared again (each validation pair counts)
        Pair([9], [8]),
    ]
    assert rows.count_shared_pairs(train, val) == 3
    assert rows.count_shared_pairs(train, []) == 0
    # rows (messages lists, texts) compare by content too
    assert (
        rows.count_shared_pairs(
            [Pair(conv("q", "a"), conv("q", "b"))], [Pair(conv("q", "a"), conv("q", "b")), Pair("a", "b")]
        )
        == 1
    )


# ----------------------------------------------------------------------------- formats


def read(path, **config):
    return rows.read_pair_rows([str(path)], data_config(**config))


def test_messages_format_from_parquet_json_strings_and_jsonl_lists_is_the_same(tmp_path):
    records = [pair_record("Q1", "g1", "b1", -3), pair_record("Q2", "g2", "b2", None)]
    from_parquet = read(write_parquet(tmp_path / "d.parquet", records))
    as_lists = [{**r, "chosen": json.loads(r["chosen"]), "rejected": json.loads(r["rejected"])} for r in records]
    from_jsonl = read(write_jsonl(tmp_path / "d.jsonl.gz", as_lists, blank_lines_after_first=2))
    for result in (from_parquet, from_jsonl):
        assert [(r.chosen, r.rejected, r.preference_strength) for r in result.rows] == [
            (conv("Q1", "g1"), conv("Q1", "b1"), -3),
            (conv("Q2", "g2"), conv("Q2", "b2"), None),
        ]
        assert [fmt.kind for fmt in result.formats.values()] == ["messages"]
    assert [r.where for r in from_parquet.rows] == [
        f"{tmp_path / 'd.parquet'} row 1",
        f"{tmp_path / 'd.parquet'} row 2",
    ]
    assert [r.where for r in from_jsonl.rows] == [
        f"{tmp_path / 'd.jsonl.gz'} line 1",
        f"{tmp_path / 'd.jsonl.gz'} line 4",
    ]


def test_explicit_prompt_with_text_responses_becomes_user_and_assistant_messages(tmp_path):
    # TRL's "standard" explicit-prompt layout, and RewardBench's: prompt, chosen, rejected as text
    path = write_jsonl(
        tmp_path / "rb.jsonl", [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No.", "subset": "alpacaeval-easy"}]
    )
    [row] = read(path).rows
    assert row.chosen == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
    assert row.rejected == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]
    assert row.subset == "alpacaeval-easy" and row.preference_strength is None
    assert read(path).formats[str(path)].kind == "prompt_response"


def test_explicit_prompt_with_messages_is_prompt_plus_response(tmp_path):
    # TRL's conversational explicit-prompt layout: the prompt messages, then the response messages
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Bye!"}],
        "rejected": [{"role": "assistant", "content": "What?"}],
    }
    path = write_parquet(tmp_path / "trl.parquet", [record])
    [row] = read(path).rows
    assert row.chosen == prompt + [{"role": "assistant", "content": "Bye!"}]
    assert row.rejected == prompt + [{"role": "assistant", "content": "What?"}]
    # the same columns as JSON strings read the same
    as_strings = {k: json.dumps(v) for k, v in record.items()}
    assert read(write_parquet(tmp_path / "trl-json.parquet", [as_strings])).rows[0].chosen == row.chosen


def test_a_prompt_column_next_to_whole_conversations_is_not_prepended_twice(tmp_path):
    record = {"prompt": "Q", **{k: json.loads(v) for k, v in pair_record("Q").items() if k != "preference_strength"}}
    path = write_jsonl(tmp_path / "whole.jsonl", [record])
    result = read(path)
    assert result.formats[str(path)].kind == "messages" and result.rows[0].chosen == conv("Q", "good")
    with pytest.raises(
        DataError, match=r"whole.jsonl line 1 field 'chosen': message 1 has role 'user'; with a prompt column"
    ):
        read(path, format="prompt_response")


def test_plain_text_pairs_are_kept_as_text_with_the_prompt_prepended_as_is(tmp_path):
    no_prompt = write_jsonl(tmp_path / "t.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    [row] = read(no_prompt).rows
    assert (row.chosen, row.rejected) == ("The sky is blue.", "The sky is green.")
    assert read(no_prompt).formats[str(no_prompt)].kind == "text"
    with_prompt = write_jsonl(
        tmp_path / "tp.jsonl", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    )
    [row] = read(with_prompt, format="text").rows
    assert (row.chosen, row.rejected) == ("The sky is blue.", "The sky is green.")


def test_a_file_matching_no_format_names_the_columns_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer_a": "a", "answer_b": "b"}])
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert f"{path}: no column 'chosen', 'rejected' (columns found: ['question', 'answer_a', 'answer_b'])" in message
    assert "expected 'chosen' + 'rejected'" in message and "'prompt'" in message and "data.chosen_key" in message
    assert "\n" not in message
    with pytest.raises(
        DataError, match=r"no column 'prompt' \(columns found: \['chosen', 'rejected', 'preference_strength'\]\)"
    ):
        read(write_parquet(tmp_path / "m.parquet", [pair_record()]), format="prompt_response")
    with pytest.raises(DataError, match=r"data.format is 'csv'; expected one of auto, messages, prompt_response, text"):
        read(path, format="csv")
    with pytest.raises(
        DataError, match=r"m.parquet row 1 field 'chosen': holds chat messages; data.format=text expects plain text"
    ):
        read(tmp_path / "m.parquet", format="text")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chosen": json.dumps(conv("q", "a")), "rejected": None}, r"row 2 field 'rejected': is null"),
        ({"chosen": json.dumps(conv("q", "a")), "rejected": "{oops"}, r"row 2 field 'rejected': not valid JSON"),
        (
            {"chosen": json.dumps(conv("q", "a")), "rejected": json.dumps([{"role": "user", "content": "q"}])},
            r"row 2 field 'rejected': the last message has role 'user'",
        ),
        (
            {**pair_record(), "preference_strength": "2"},
            r"row 2 field 'preference_strength': is '2'; expected an integer",
        ),
        (
            {**pair_record(), "preference_strength": 1.5},
            r"row 2 field 'preference_strength': is 1.5; expected an integer",
        ),
    ],
)
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [pair_record(), record])
    with pytest.raises(DataError, match=message.replace("row 2", "line 2")):
        read(path)
    if not isinstance(record.get("preference_strength"), (str, float)):  # Parquet keeps one type per column
        with pytest.raises(DataError, match=message):
            read(write_parquet(tmp_path / "bad.parquet", [pair_record(), record]))


def test_strengths_read_as_integers_with_null_kept(tmp_path):
    pairs = read(
        write_parquet(
            tmp_path / "s.parquet", [pair_record(strength=2.0), pair_record(strength=None), pair_record(strength=-1.0)]
        )
    ).rows
    assert [r.preference_strength for r in pairs] == [2, None, -1]
    assert all(type(r.preference_strength) in (int, type(None)) for r in pairs)


def test_pairs_whose_chosen_equals_rejected_are_dropped_and_counted(tmp_path):
    same = pair_record("Q", "same", "same")
    path = write_parquet(tmp_path / "d.parquet", [pair_record("A"), same, pair_record("B"), same])
    result = read(path)
    assert [r.chosen[0]["content"] for r in result.rows] == ["A", "B"]
    assert result.identical_dropped == 2
    assert "dropped 2 pairs whose chosen equals rejected" in result.describe() and f"{path} row 2" in result.describe()
    kept = rows.read_pair_rows(
        [str(path)], data_config(), drop_identical=False
    )  # RewardBench keeps them (a tie is wrong)
    assert len(kept.rows) == 4 and kept.identical_dropped == 0


def test_json_array_files_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    [row] = read(path).rows
    assert row.chosen == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert row.where == f"{path} item 1"


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not json", "not valid JSON"),
        (json.dumps([]), "non-empty list"),
        (json.dumps([{"role": "user"}]), "message 1 is not"),
        (json.dumps([{"role": "user", "content": "hi"}]), "expected the assistant response"),
    ],
)
def test_parse_messages_errors_name_the_place(bad, message):
    with pytest.raises(DataError, match=message) as error:
        rows.parse_messages(bad, "f.parquet row 3 field 'chosen'")
    assert str(error.value).startswith("f.parquet row 3 field 'chosen'")


def test_messages_keep_role_and_content_only_and_the_report_counts_the_dropped_keys(tmp_path):
    """verl's reward paths render role and content only: every other key is dropped, visibly."""
    prompt = [{"role": "system", "content": "Be brief.", "name": "policy"}, {"role": "user", "content": "Weather?"}]
    chosen = [
        {
            "role": "assistant",
            "content": "Sunny.",
            "reasoning_content": "Check first.",
            "tool_calls": [{"name": "weather"}],
        }
    ]
    rejected = [{"role": "assistant", "content": "No idea."}]
    explicit = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    whole = write_jsonl(tmp_path / "m.jsonl", [{"chosen": prompt + chosen, "rejected": prompt + rejected}])
    for path, carried in ((explicit, 2), (whole, 3)):  # a whole conversation repeats the prompt in chosen and rejected
        result = read(path)
        [row] = result.rows
        assert row.chosen == [{"role": m["role"], "content": m["content"]} for m in prompt + chosen]
        assert row.rejected == [{"role": m["role"], "content": m["content"]} for m in prompt + rejected]
        assert (result.dropped_keys.messages, result.dropped_keys.keys) == (
            carried,
            {"name", "reasoning_content", "tool_calls"},
        )
        assert (
            f"{carried} messages carried keys other than role/content (name, reasoning_content, tool_calls): dropped"
            in result.describe().splitlines()[-1]
        )
    plain = read(write_jsonl(tmp_path / "plain.jsonl", [{"chosen": conv("q", "a"), "rejected": conv("q", "b")}]))
    assert plain.dropped_keys.messages == 0 and "role/content" not in plain.describe()
    assert rows.parse_messages(json.dumps(prompt + chosen), "x") == row.chosen  # no counter given: dropped all the same
