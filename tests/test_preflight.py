"""btrm.preflight: the model check, the hub probe (model check and data set downloads), each within seconds."""

import socket
import threading
import time

import pytest

from btrm import preflight
from btrm.schema import PreflightError
from conftest import REPO, closed_loopback_port

# ---- the model


def test_model_path_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(PreflightError, match=r"^model.partial_pretrain=/no/such/dir: this path does not exist;"):
        preflight.check_model("/no/such/dir")
    # a mistyped relative path whose first part is a local directory is a path, not a hub id
    with pytest.raises(
        PreflightError,
        match=rf"^model.partial_pretrain=demo/tiny-qwen4: this path does not exist \(relative paths are read from {REPO}\)",
    ):
        preflight.check_model("demo/tiny-qwen4")
    with pytest.raises(PreflightError, match="this path does not exist"):
        preflight.check_model("./models/qwen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="the directory has no config.json"):
        preflight.check_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert preflight.check_model(str(tmp_path / "empty")).startswith("local directory")


def test_unreachable_hub_is_one_line_within_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    port = closed_loopback_port()
    environ = {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    with pytest.raises(PreflightError) as refused:
        preflight.check_model("bt-rm-tests/no-such-model", environ)
    assert time.monotonic() - started < preflight.HUB_PROBE_TIMEOUT_S + 1
    assert str(refused.value).startswith(
        f"model.partial_pretrain=bt-rm-tests/no-such-model is a Hugging Face hub id, but the hub "
        f"cannot be reached (127.0.0.1:{port}: Connection refused); download it where the hub is "
        "reachable and pass its local directory (MODEL_PATH=/path/to/model)"
    )
    # behind a proxy the client connects to the proxy: that is what is probed
    with pytest.raises(PreflightError, match=r"the proxy in HTTPS_PROXY: Connection refused"):
        preflight.check_model("bt-rm-tests/no-such-model", {"HTTPS_PROXY": f"http://127.0.0.1:{port}"})


def test_hub_probe_gives_up_after_its_timeout_even_when_name_lookup_hangs(monkeypatch):
    release = threading.Event()

    def never_answers(*args, **kwargs):  # a name lookup that hangs until the test ends
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    monkeypatch.setattr(preflight, "HUB_PROBE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(
            PreflightError, match=r"the hub cannot be reached \(huggingface.co:443: no answer within 0.5 s\)"
        ):
            preflight.check_model("bt-rm-tests/no-such-model", {})
    finally:
        release.set()
    assert time.monotonic() - started < 2


def test_reachable_hub_and_offline_cache(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert (
            preflight.check_model("bt-rm-tests/no-such-model", {"HF_ENDPOINT": endpoint})
            == "hub id bt-rm-tests/no-such-model"
        )
    with pytest.raises(
        PreflightError, match=r"not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    ):
        preflight.check_model("bt-rm-tests/no-such-model", {"HF_HUB_OFFLINE": "1"})
    monkeypatch.setattr(preflight, "cached_model_config", lambda repo_id: "/cache/config.json")
    assert "from the local cache" in preflight.check_model("bt-rm-tests/cached-model", {"HF_HUB_OFFLINE": "1"})
    with pytest.raises(PreflightError, match="it is in the local cache: rerun with HF_HUB_OFFLINE=1 to use that copy"):
        preflight.check_model("bt-rm-tests/cached-model", {"HF_ENDPOINT": f"http://127.0.0.1:{closed_loopback_port()}"})


# ---- the hub probe of data set downloads (prepare_helpsteer2.py, evaluate_rm.py)


def test_data_set_probe_follows_the_endpoint_and_the_proxy():
    port = closed_loopback_port()
    started = time.monotonic()
    assert (
        preflight.hub_unreachable_reason(environ={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
        == f"127.0.0.1:{port} is unreachable (Connection refused)"
    )
    assert time.monotonic() - started < 2
    assert (
        preflight.hub_unreachable_reason(environ={"HTTPS_PROXY": f"127.0.0.1:{port}"})
        == "the proxy in HTTPS_PROXY is unreachable (Connection refused)"
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert (
            preflight.hub_unreachable_reason(environ={"HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}"})
            is None
        )


def test_data_set_probe_gives_up_after_its_timeout(monkeypatch):
    release = threading.Event()

    def never_answers(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", never_answers)
    started = time.monotonic()
    try:
        assert preflight.hub_unreachable_reason(0.5, {}) == "huggingface.co:443 is unreachable (no answer within 0.5 s)"
    finally:
        release.set()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "offline, probed",
    [
        ({"HF_HUB_OFFLINE": "1"}, False),
        ({"TRANSFORMERS_OFFLINE": "yes"}, False),
        ({"HF_DATASETS_OFFLINE": "true"}, False),
        (
            {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"},
            True,
        ),  # datasets' own variable wins, as in datasets.config
        ({"HF_HUB_OFFLINE": "0"}, True),
    ],
)
def test_data_set_probe_is_skipped_in_datasets_offline_mode(offline, probed):
    """Offline, `datasets` reads its local cache: nothing to probe, and no reason to stop."""
    reason = preflight.hub_unreachable_reason(
        environ={"HF_ENDPOINT": f"http://127.0.0.1:{closed_loopback_port()}", **offline}
    )
    assert (reason is not None) == probed


# ---- start-up warnings on the data read (issue 28)


class Pairs:
    """A stand-in dataset: TokenizedPairs and their groups (what the trainer's datasets expose)."""

    def __init__(self, pairs, groups=None):
        self.pairs, self.groups = pairs, groups or [{} for _ in pairs]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]


def data_config(**changes):
    from btrm.schema import compose_config

    return compose_config([f"data.{key}={value}" for key, value in changes.items()]).data


def test_group_columns_no_validation_pair_has_are_one_warning_line():
    from btrm.pair_dataset import TokenizedPair

    pair = TokenizedPair([1, 2, 3], [1, 2, 4])
    train = Pairs([pair], [{"nope": "x"}])  # in the training rows only: still no validation metric
    val = Pairs([pair, pair], [{"domain": "code"}, {}])
    lines = preflight.data_warnings(data_config(group_columns="[domain,nope]"), train, val)
    assert lines == [
        "WARNING: data.group_columns=[domain,nope]: no validation pair has 'nope' "
        "(data.val_files=data/helpsteer2/test.parquet); no val/accuracy_<column>_<value> metrics for it"
    ]
    assert preflight.data_warnings(data_config(group_columns="[domain]"), train, val) == []
    # trainer.yaml's own list (domain, language, subset) is its "where present" default: no warning
    assert preflight.data_warnings(data_config(), train, Pairs([pair], [{}])) == []


def test_a_token_budget_below_every_pair_is_one_warning_line_and_the_summary_says_pairs_run_alone():
    from btrm import batching
    from btrm.pair_dataset import TokenizedPair

    # by hand: 6 + 5 = 11 tokens, 2 shared -> 9 computed when shared; 4 + 4 = 8 tokens, none shared
    pairs = Pairs([TokenizedPair([1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9]), TokenizedPair([5, 6, 7, 8], [9, 9, 9, 9])])
    config = data_config(max_tokens_per_micro_batch=7)
    assert preflight.data_warnings(config, pairs, Pairs([])) == [
        "WARNING: data.max_tokens_per_micro_batch=7 is smaller than the smallest pair (8 computed tokens): "
        "every micro-batch holds one pair, over the budget; raise it (auto plans one)"
    ]
    assert preflight.data_warnings(data_config(max_tokens_per_micro_batch=8), pairs, Pairs([])) == []
    # 9 computed tokens when shared, 11 whole: a budget of 10 is over the pair's smallest layout
    lone = Pairs([TokenizedPair([1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9])])
    assert preflight.data_warnings(data_config(max_tokens_per_micro_batch=10), lone, Pairs([])) == []
    assert preflight.data_warnings(data_config(max_tokens_per_micro_batch=9), lone, Pairs([])) == []  # fits exactly
    assert (
        "smallest pair (9 computed tokens)"
        in preflight.data_warnings(data_config(max_tokens_per_micro_batch=8), lone, Pairs([]))[0]
    )
    for setting in ("auto", "null"):
        assert preflight.data_warnings(data_config(max_tokens_per_micro_batch=setting), pairs, Pairs([])) == []
    budget = batching.TokenBudget(7, "set by data.max_tokens_per_micro_batch")
    assert batching.describe_micro_batches(budget, None, batching.smallest_pair_over_budget(pairs.pairs, 7)) == (
        "micro-batches of one pair each: the smallest pair computes 8 tokens, more than the 7-token budget "
        "(set by data.max_tokens_per_micro_batch)"
    )
    assert batching.smallest_pair_over_budget(pairs.pairs, 8) is None


def test_a_run_says_both_at_start(tmp_path, tiny_model_dir, demo_data_dir):
    """A real (one-step) run: the warnings come from bt_trainer's start, before the first step, on rank 0 only."""
    from conftest import run_trainer

    result, _ = run_trainer(
        tmp_path,
        tiny_model_dir,
        demo_data_dir,
        "data.group_columns=[nope]",
        "data.max_tokens_per_micro_batch=10",
        "trainer.total_training_steps=1",
        "trainer.check_layout=false",
    )
    lines = result.stdout.splitlines()
    group = [
        line for line in lines if line.startswith("WARNING: data.group_columns=[nope]: no validation pair has 'nope'")
    ]
    budget = [line for line in lines if line.startswith("WARNING: data.max_tokens_per_micro_batch=10 is smaller than")]
    assert len(group) == 1 and len(budget) == 1, result.stdout[-3000:]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1"))
    assert lines.index(group[0]) < first_step and lines.index(budget[0]) < first_step
    assert "micro-batches of one pair each: the smallest pair computes" in result.stdout
    assert "<= 10 computed tokens" not in result.stdout
