"""btrm.pair_dataset: a conversation's tokens (one path for training, score() and evaluate_rm.py), truncation, PairDataset."""

import copy
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from test_rows import conv, data_config, pair_record, write_jsonl, write_parquet

import evaluate_rm
from btrm import batching, pair_dataset, rows
from btrm.rows import DataError

# ----------------------------------------------------------------------------- tokens


def test_encode_applies_template_once_without_extra_special_tokens(tokenizer):
    ids = pair_dataset.encode_conversation(tokenizer, conv("Hi", "Hello"))
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bos_is_not_doubled_when_template_writes_it(tokenizer):
    """A Llama-style template writes BOS; a tokenizer that also adds BOS would double it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str()),
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    with_bos.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    assert with_bos("x")["input_ids"][0] == bos  # the tokenizer on its own would add BOS
    ids = pair_dataset.encode_conversation(with_bos, conv("Hi", "Hello"))
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


# A chat template that, like Qwen3's, renders an assistant message's reasoning_content and tool_calls
REASONING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.reasoning_content is defined %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}"
    "{% if m.tool_calls is defined %}{% for call in m.tool_calls %}\n<tool_call>{{ call | tojson }}</tool_call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT_WITH_EXTRAS = [
    {"role": "system", "content": "Be brief.", "name": "policy"},
    {"role": "user", "content": "Weather in Paris?", "name": "alice"},
]
CHOSEN_WITH_EXTRAS = PROMPT_WITH_EXTRAS + [
    {
        "role": "assistant",
        "content": "Sunny, 21 C.",
        "reasoning_content": "Look it up before answering.",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    }
]
REJECTED_WITH_EXTRAS = PROMPT_WITH_EXTRAS + [
    {"role": "assistant", "content": "No idea.", "reasoning_content": "I cannot know."}
]


def test_training_score_and_evaluate_rm_tokenize_role_and_content_only(
    tokenizer, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """One conversation path: the same tokens in training, score() and evaluate_rm.py, as verl's reward paths render them."""
    reasoning_tokenizer = copy.deepcopy(tokenizer)
    reasoning_tokenizer.chat_template = REASONING_TEMPLATE
    conversations = (CHOSEN_WITH_EXTRAS, REJECTED_WITH_EXTRAS)
    reference = [
        reasoning_tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in c], tokenize=True
        )
        for c in conversations
    ]
    unreduced = reasoning_tokenizer.apply_chat_template(CHOSEN_WITH_EXTRAS, tokenize=False)
    assert "<think>" in unreduced and "<tool_call>" in unreduced  # the template would render the extra keys
    path = write_jsonl(tmp_path / "extras.jsonl", [{"chosen": CHOSEN_WITH_EXTRAS, "rejected": REJECTED_WITH_EXTRAS}])

    dataset = pair_dataset.PairDataset([str(path)], reasoning_tokenizer, data_config())
    training = [dataset[0].chosen, dataset[0].rejected]
    assert (
        "6 messages carried keys other than role/content (name, reasoning_content, tool_calls): dropped"
        in dataset.read_report
    )

    fed = []  # the token sequences each path hands to the model, read back from the padded batches

    def recording_rewards(model, batch):
        fed.extend(
            row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        )
        return torch.zeros(batch["input_ids"].shape[0])

    monkeypatch.setattr(batching, "compute_rewards", recording_rewards)
    stand_in_model = torch.nn.Linear(1, 1)
    batching.score(stand_in_model, reasoning_tokenizer, list(conversations))
    scored, fed[:] = list(fed), []
    monkeypatch.setattr(evaluate_rm, "load_reward_model", lambda *args, **kwargs: (stand_in_model, reasoning_tokenizer))
    monkeypatch.setattr(evaluate_rm, "check_reward_model", lambda model_dir: None)  # the stand-in is the reward model
    evaluate_rm.main(["--model", str(tiny_model_dir), "--data", str(path), "--no-progress"])
    evaluated = list(fed)

    assert training == scored == evaluated == reference
    printed = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith(
            "read 6 messages carried keys other than role/content (name, reasoning_content, tool_calls): dropped"
        )
        for line in printed
    )


def test_plain_text_without_an_eos_token_is_a_data_error_naming_the_row(tokenizer, tmp_path):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    path = write_jsonl(tmp_path / "t.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    with pytest.raises(
        DataError, match=rf"^{path} line 1: data.format=text appends the eos token, but the tokenizer has none"
    ):
        pair_dataset.PairDataset([str(path)], no_eos, data_config(format="text"))


# ----------------------------------------------------------------------------- truncation (expected token lists written out by hand)

PROMPT = list(range(1, 11))  # 10 prompt tokens both conversations share


def test_truncation_left_never_empties_the_shorter_conversation():
    """The old bug: dropping the longer one's overflow from both emptied a short chosen."""
    chosen, rejected = PROMPT + [50, 51], PROMPT + list(range(60, 90))  # 12 and 40 tokens
    result = pair_dataset.truncate_pair(chosen, rejected, 20, "left", "row 1")
    assert result.chosen == [50, 51]  # lost its prompt only (all 10 shared tokens), not its response
    assert result.rejected == list(range(70, 90))  # its response alone (30) exceeds 20: cut from its start
    assert result.dropped_tokens == 10 + 20


def test_truncation_left_drops_only_what_the_longer_one_needs_from_the_shared_prompt():
    chosen, rejected = PROMPT + [50, 51, 52], PROMPT + [60, 61, 62, 63, 64]  # 13 and 15 tokens
    result = pair_dataset.truncate_pair(chosen, rejected, 12, "left", "row 1")
    assert result.chosen == [4, 5, 6, 7, 8, 9, 10, 50, 51, 52]  # the same 3 oldest prompt tokens from both
    assert result.rejected == [4, 5, 6, 7, 8, 9, 10, 60, 61, 62, 63, 64]
    assert result.dropped_tokens == 6


def test_truncation_left_when_one_conversation_is_a_prefix_of_the_other():
    result = pair_dataset.truncate_pair([1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8], 4, "left", "row 1")
    assert result.chosen == [3]  # at most len - 1 shared tokens are dropped: its last token stays
    assert result.rejected == [5, 6, 7, 8]
    identical = pair_dataset.truncate_pair(list(range(10)), list(range(10)), 4, "left", "row 1")
    assert identical.chosen == identical.rejected == [6, 7, 8, 9]


def test_truncation_left_with_nothing_shared_cuts_each_from_its_start():
    result = pair_dataset.truncate_pair([1, 2, 3, 4, 5], [9, 8], 3, "left", "row 1")
    assert (result.chosen, result.rejected, result.dropped_tokens) == ([3, 4, 5], [9, 8], 2)


@pytest.mark.parametrize("seed", range(30))
def test_truncation_left_invariants(seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(100) for _ in range(rng.randint(0, 30))]
    chosen = prompt + [rng.randrange(100) for _ in range(rng.randint(1, 30))]
    rejected = prompt + [rng.randrange(100) for _ in range(rng.randint(1, 30))]
    max_length = rng.randint(1, 40)
    result = pair_dataset.truncate_pair(chosen, rejected, max_length, "left", "row")
    for before, after in ((chosen, result.chosen), (rejected, result.rejected)):
        assert 1 <= len(after) <= max(max_length, 1) and after[-1] == before[-1]  # never empty, reward token kept
        assert before[len(before) - len(after) :] == after  # a tail of the original
        if len(before) <= max_length:  # fits: loses shared tokens only
            assert len(before) - len(after) <= pair_dataset.shared_prefix_length([chosen, rejected])
    dropped = len(chosen) - len(result.chosen)
    if (
        max(len(chosen), len(rejected)) > max_length
        and len(result.chosen) < max_length
        and len(result.rejected) < max_length
    ):
        assert (
            len(rejected) - len(result.rejected) == dropped
        )  # neither needed a response cut: the same count from both
    assert result.dropped_tokens == len(chosen) + len(rejected) - len(result.chosen) - len(result.rejected)


def test_truncation_right_keeps_head_and_reward_token():
    result = pair_dataset.truncate_pair(list(range(10)), list(range(100, 105)), 6, "right", "row 1")
    assert result.chosen == [0, 1, 2, 3, 4, 9]
    assert result.rejected == list(range(100, 105))  # within the limit: untouched
    assert result.dropped_tokens == 4


def test_truncation_error_names_row_and_both_lengths():
    with pytest.raises(
        DataError, match=r"data.parquet row 7: chosen has 10 tokens and rejected 5; data.max_length is 6"
    ):
        pair_dataset.truncate_pair(list(range(10)), list(range(5)), 6, "error", "data.parquet row 7")
    assert pair_dataset.truncate_pair([1, 2], [3], 6, "error", "x") == ([1, 2], [3], 0)


# ----------------------------------------------------------------------------- PairDataset


def test_pair_dataset_tokenizes_every_format_like_its_reference(tokenizer, tmp_path):
    pair_conversations = (conv("Say hi", "Hi there!"), conv("Say hi", "Go away."))
    messages = write_parquet(
        tmp_path / "m.parquet",
        [{"chosen": json.dumps(pair_conversations[0]), "rejected": json.dumps(pair_conversations[1])}],
    )
    explicit = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Say hi", "chosen": "Hi there!", "rejected": "Go away.", "subset": "s1"}]
    )
    datasets = [pair_dataset.PairDataset([str(p)], tokenizer, data_config()) for p in (messages, explicit)]
    expected = [pair_dataset.encode_conversation(tokenizer, c) for c in pair_conversations]
    for dataset in datasets:
        assert (dataset[0].chosen, dataset[0].rejected) == tuple(expected)
    assert datasets[1].subsets == ["s1"] and datasets[1].sources == [f"{explicit} line 1"]

    # plain text: TRL's rule, written out independently: append the eos string, then tokenize as the tokenizer does
    text = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    dataset = pair_dataset.PairDataset([str(text)], tokenizer, data_config(format="text"))
    assert dataset[0].chosen == tokenizer("The sky is blue." + tokenizer.eos_token)["input_ids"]
    assert dataset[0].rejected == tokenizer("The sky is green." + tokenizer.eos_token)["input_ids"]
    assert dataset[0].chosen[-1] == tokenizer.eos_token_id != tokenizer.pad_token_id
    already = write_jsonl(tmp_path / "t2.jsonl", [{"chosen": "blue." + tokenizer.eos_token, "rejected": "green."}])
    assert (
        pair_dataset.PairDataset([str(already)], tokenizer, data_config())[0].chosen
        == tokenizer("blue." + tokenizer.eos_token)["input_ids"]
    )


def test_pair_dataset_reports_reading_errors_as_the_one_data_error(tokenizer, tmp_path):
    assert pair_dataset.DataError is rows.DataError
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])
    with pytest.raises(rows.DataError, match=r"odd.jsonl: no column 'chosen', 'rejected'"):
        pair_dataset.PairDataset([str(path)], tokenizer, data_config())


def test_pair_dataset_counts_dropped_identical_pairs_and_honours_max_samples(tokenizer, tmp_path):
    path = write_parquet(
        tmp_path / "d.parquet", [pair_record("A"), pair_record("Q", "x", "x"), pair_record("B"), pair_record("C")]
    )
    dataset = pair_dataset.PairDataset([str(path)], tokenizer, data_config(), max_samples=2)
    assert len(dataset) == 2 and dataset.identical_pairs_dropped == 1
    assert dataset.sources == [f"{path} row 1", f"{path} row 3"]
    assert dataset[1].chosen == pair_dataset.encode_conversation(tokenizer, conv("B", "good"))


def test_pair_dataset_counts_truncated_pairs_and_dropped_tokens(tokenizer, tmp_path):
    short = {"chosen": json.dumps(conv("Q", "ok")), "rejected": json.dumps(conv("Q", "no"))}
    long_rejected = {"chosen": json.dumps(conv("Q", "ok")), "rejected": json.dumps(conv("Q", "no " * 40))}
    pq.write_table(pa.Table.from_pylist([short, long_rejected, long_rejected]), tmp_path / "t.parquet")
    limit = len(pair_dataset.encode_conversation(tokenizer, conv("Q", "no " * 40))) - 5
    dataset = pair_dataset.PairDataset(
        str(tmp_path / "t.parquet"), tokenizer, data_config(max_length=limit, truncation="left")
    )
    assert dataset.truncated_pairs == 2
    # each long pair: 5 shared prompt tokens from both conversations (the prompt is longer than 5 tokens)
    assert dataset.dropped_tokens == 2 * 10
    assert all(len(p.chosen) >= 1 and max(len(p.chosen), len(p.rejected)) <= limit for p in dataset.pairs)


def test_pair_dataset_reads_tokenizes_and_reports_bad_rows(tokenizer, tmp_path):
    good = {
        "chosen": json.dumps(conv("Q", "good answer")),
        "rejected": json.dumps(conv("Q", "bad")),
        "preference_strength": 2,
    }
    pq.write_table(pa.Table.from_pylist([good, good]), tmp_path / "ok.parquet")
    dataset = pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config())
    assert len(dataset) == 2 and dataset[0].preference_strength == 2
    assert dataset[0].chosen == pair_dataset.encode_conversation(tokenizer, conv("Q", "good answer"))

    bad = dict(good, rejected="{oops")
    pq.write_table(pa.Table.from_pylist([good, bad]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2 field 'rejected': not valid JSON"):
        pair_dataset.PairDataset(str(tmp_path / "bad.parquet"), tokenizer, data_config())
    with pytest.raises(DataError, match=r"ok.parquet: no column 'prompt_chosen'"):
        pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(chosen_key="prompt_chosen"))
    with pytest.raises(
        DataError, match=r"ok.parquet row 1: chosen has \d+ tokens and rejected \d+; data.max_length is 5"
    ):
        pair_dataset.PairDataset(str(tmp_path / "ok.parquet"), tokenizer, data_config(max_length=5))


# ----------------------------------------------------------------------------- data.custom_cls

CUSTOM_DATASETS = """
from btrm.pair_dataset import TokenizedPair


class Complete:
    def __init__(self, parquet_files, tokenizer, config, max_samples=-1):
        self.pairs = [TokenizedPair([1, 2], [1, 3])]
        self.read_report = "custom: one pair"
        self.truncated_pairs = self.dropped_tokens = self.identical_pairs_dropped = 0
        self.formats = {}
        self.sources = ["custom 1"]
        self.subsets = [None]
        self.groups = [{}]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]


class WithoutReportAndSubsets:
    def __init__(self, parquet_files, tokenizer, config, max_samples=-1):
        self.pairs = [TokenizedPair([1, 2], [1, 3])]
        self.truncated_pairs = self.dropped_tokens = self.identical_pairs_dropped = 0
        self.formats = {}
        self.sources = ["custom 1"]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]
"""


def custom_config(path, name, **overrides):
    return OmegaConf.merge(
        data_config(**overrides),
        {"max_samples": -1, "custom_cls": {"path": None if path is None else str(path), "name": name}},
    )


def test_a_custom_dataset_lacking_members_of_the_protocol_is_refused_naming_them(tokenizer, tmp_path):
    module = tmp_path / "my_datasets.py"
    module.write_text(CUSTOM_DATASETS)
    data = write_parquet(tmp_path / "d.parquet", [pair_record()])
    with pytest.raises(DataError) as error:
        pair_dataset.create_pair_dataset(str(data), custom_config(module, "WithoutReportAndSubsets"), tokenizer)
    message = str(error.value)
    assert message == (
        f"data.custom_cls.path={module} data.custom_cls.name=WithoutReportAndSubsets: the dataset lacks read_report, subsets, groups; "
        "the trainer and evaluate_rm.py read every member of btrm.pair_dataset.PreferenceDataset"
    )

    accepted = pair_dataset.create_pair_dataset(str(data), custom_config(module, "Complete"), tokenizer)
    assert type(accepted).__name__ == "Complete" and isinstance(accepted, pair_dataset.PreferenceDataset)
    assert accepted[0] == pair_dataset.TokenizedPair([1, 2], [1, 3])


def test_pair_dataset_satisfies_the_protocol(tokenizer, tmp_path):
    data = write_parquet(tmp_path / "d.parquet", [pair_record()])
    dataset = pair_dataset.create_pair_dataset(str(data), custom_config(None, None), tokenizer)
    assert type(dataset) is pair_dataset.PairDataset and isinstance(dataset, pair_dataset.PreferenceDataset)
    assert all(
        hasattr(dataset, member)
        for member in (
            "read_report",
            "truncated_pairs",
            "dropped_tokens",
            "identical_pairs_dropped",
            "formats",
            "sources",
            "subsets",
            "groups",
            "__len__",
            "__getitem__",
        )
    )


def test_group_index_orders_values_by_size_pools_beyond_the_cap_and_skips_missing_columns():
    groups = [
        {"domain": "code", "language": "en"},
        {"domain": "code"},
        {"domain": "chat", "language": "de"},
        {"domain": "math", "language": "en"},
        {"domain": "code", "language": "en"},
        {"domain": "safety"},
        {},
        {"domain": "chat"},
    ]
    index = pair_dataset.group_index(groups, ["domain", "language", "subset"], max_groups=3)
    # domain: code 3, chat 2, math 1, safety 1 -> 4 values over the cap of 3: code, chat kept, math + safety pooled
    assert index.labels == ["domain_code", "domain_chat", "domain_other", "language_en", "language_de"]
    assert index.pooled == {"domain": 2}
    assert index.columns == ["domain"] * 3 + ["language"] * 2
    assert index.members == [[0, 3], [0], [1, 4], [2, 3], [0, 3], [2], [], [1]]
    uncapped = pair_dataset.group_index(groups, ["domain"], max_groups=4)
    # sizes tie (math 1, safety 1): ordered by value, the same on every rank
    assert uncapped.labels == ["domain_code", "domain_chat", "domain_math", "domain_safety"] and uncapped.pooled == {}
    assert pair_dataset.group_label("task type", "a/b") == "task_type_a_b"
    # values whose labels coincide are one group: one metric key each
    merged = pair_dataset.group_index([{"d": "a b"}, {"d": "a_b"}, {"d": "other"}, {"d": "x"}, {"d": "y"}], ["d"], 3)
    # sizes tie, so by value: "a b" and "a_b" kept (one label), "other", "x", "y" pooled (with the real "other")
    assert merged.labels == ["d_a_b", "d_other"] and merged.members == [[0], [0], [1], [1], [1]]
    assert merged.pooled == {"d": 3}


def test_group_labels_that_collide_across_columns_are_refused_with_both_columns_and_values():
    """domain=code_py and domain_code=py would both be val/accuracy_domain_code_py: one would overwrite the other."""
    groups = [{"domain": "code_py", "domain_code": "js"}, {"domain": "chat", "domain_code": "py"}]
    with pytest.raises(ValueError) as refused:
        pair_dataset.group_index(groups, ["domain", "domain_code"], 12)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("data.group_columns: ")
    assert "domain=code_py" in message and "domain_code=py" in message and "val/accuracy_domain_code_py" in message
    # distinct labels across columns pass
    assert pair_dataset.group_index(groups[:1], ["domain", "domain_code"], 12).labels == [
        "domain_code_py",
        "domain_code_js",
    ]


def test_group_columns_are_read_from_parquet_and_jsonl_rows(tmp_path):
    records = [
        {**pair_record(good="g1"), "domain": "code", "language": None},
        {**pair_record(good="g2"), "domain": 7},
        pair_record(good="g3"),
    ]
    parquet = write_parquet(
        tmp_path / "val.parquet", [{**r, "domain": str(r.get("domain", "")) or None} for r in records]
    )
    jsonl = write_jsonl(tmp_path / "val.jsonl", records)  # domain 7 a number here, missing in the third row
    for path in (parquet, jsonl):
        read = rows.read_pair_rows([str(path)], data_config(group_columns=["domain", "language"]))
        assert [row.groups for row in read.rows] == [{"domain": "code"}, {"domain": "7"}, {}], path
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**pair_record(), "domain": ["a", "b"]}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1 field 'domain': is a list; expected a category"):
        rows.read_pair_rows([str(bad)], data_config(group_columns=["domain"]))
