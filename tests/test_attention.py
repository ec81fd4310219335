"""attention.py: attention over segments, checked against independent references.

- the attention function against attention written out by hand (softmax of scores under an
  explicit bottom-right causal mask, GQA by head groups);
- whole models in the packed and shared layouts against transformers run unpadded, per padded
  batch, with its own sdpa (a separate model object that never had segment attention): rewards,
  the BT loss and every gradient;
- the CUDA branch (varlen_attn, which cannot run here) by feeding the exact arguments it builds
  through an emulation of varlen_attn's documented semantics.
"""

import copy
import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from btrm import attention, batching, pair_dataset
from btrm.pair_dataset import TokenizedPair
from conftest import REPO


def conv(*turns):
    """Alternating user / assistant messages; the last one is the assistant response being judged."""
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


# ----------------------------------------------------------------------------- references written out by hand


def attention_by_hand(q, k, v, query_positions, key_positions, scale):
    """softmax(q k^T * scale) v for one segment; query i sees key j iff j <= i + len(keys) - len(queries).

    q: [heads, tokens, dim]; k, v: [kv_heads, tokens, dim], query head h reads kv head h // (heads // kv_heads).
    """
    q_s, k_s, v_s = q[:, query_positions], k[:, key_positions], v[:, key_positions]
    group = q.shape[0] // k.shape[0]
    k_s, v_s = k_s[torch.arange(q.shape[0]) // group], v_s[torch.arange(q.shape[0]) // group]
    scores = torch.einsum("hqd,hkd->hqk", q_s, k_s) * scale
    n_q, n_k = len(query_positions), len(key_positions)
    allowed = torch.tensor([[j <= i + n_k - n_q for j in range(n_k)] for i in range(n_q)])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,hkd->hqd", scores.softmax(-1), v_s)


def emulated_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """varlen_attn's documented semantics on CPU, checking every argument the CUDA branch passes.

    query [Tq, Hq, D], key/value [Tk, Hkv, D]; segment s is queries cu_seq_q[s]:cu_seq_q[s+1] and
    keys cu_seq_k[s]:cu_seq_k[s+1]; window_size (-1, 0) is causal, aligned bottom-right as
    FlashAttention 2 does for fewer queries than keys.
    """
    assert (
        cu_seq_q.dtype == torch.int32 and cu_seq_k.dtype == torch.int32
    )  # FlashAttention's cumulative lengths are int32
    assert (
        query.dim() == key.dim() == value.dim() == 3
        and query.is_contiguous()
        and key.is_contiguous()
        and value.is_contiguous()
    )
    assert window_size == (-1, 0)
    assert enable_gqa == (query.shape[1] != key.shape[1])
    q_bounds, k_bounds = cu_seq_q.tolist(), cu_seq_k.tolist()
    assert q_bounds[0] == 0 == k_bounds[0] and q_bounds[-1] == query.shape[0] and k_bounds[-1] == key.shape[0]
    assert max_q == max(b - a for a, b in itertools.pairwise(q_bounds)) and max_k == max(
        b - a for a, b in itertools.pairwise(k_bounds)
    )
    out = torch.empty_like(query)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    for s in range(len(q_bounds) - 1):
        qs, ks = list(range(q_bounds[s], q_bounds[s + 1])), list(range(k_bounds[s], k_bounds[s + 1]))
        out[q_bounds[s] : q_bounds[s + 1]] = attention_by_hand(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), qs, ks, scale
        ).transpose(0, 1)
    return out


def emulated_varlen_attn_torch_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """torch 2.11's signature: no enable_gqa (passing it raises TypeError); fewer key/value heads are taken as GQA."""
    return emulated_varlen_attn(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=window_size,
        enable_gqa=query.shape[1] != key.shape[1],
    )


VARLEN_SIGNATURES = {"torch-2.13": emulated_varlen_attn, "torch-2.11": emulated_varlen_attn_torch_2_11}


def test_installed_varlen_attn_signature_is_one_the_cuda_branch_knows():
    from torch.nn.attention.varlen import varlen_attn

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    assert attention.takes_enable_gqa(varlen_attn) == (version >= (2, 13))
    assert not attention.takes_enable_gqa(emulated_varlen_attn_torch_2_11)


# ----------------------------------------------------------------------------- the segment description


def test_segment_layout_from_shared_pair():
    # row: chosen [0..3], rejected suffix [4..5] whose keys are the prefix [0, 1] then itself
    layout = attention.SegmentLayout.from_segments([((0, 4), [(0, 4)]), ((4, 6), [(0, 2), (4, 6)])])
    assert layout.query_lengths == (4, 2) and layout.key_lengths == (4, 4)
    assert layout.cu_seq_q.tolist() == [0, 4, 6] and layout.cu_seq_k.tolist() == [0, 4, 8]
    assert layout.cu_seq_q.dtype == layout.cu_seq_k.dtype == torch.int32
    assert layout.key_index.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]
    assert (layout.max_q, layout.max_k) == (4, 4)


def test_segment_layout_of_plain_packing_needs_no_gather():
    layout = attention.SegmentLayout.from_segments([((0, 3), [(0, 3)]), ((3, 4), [(3, 4)])])
    assert layout.key_index is None and layout.cu_seq_k.tolist() == [0, 3, 4]


@pytest.mark.parametrize(
    "segments, message",
    [
        ([((1, 3), [(1, 3)])], "do not continue the row"),  # a gap before the first segment
        ([((0, 3), [(0, 3)]), ((4, 5), [(4, 5)])], "do not continue the row"),  # a gap between segments
        ([((0, 3), [(0, 2)])], "do not end with its queries"),  # keys stop before the queries end
        ([((0, 3), [(0, 3)]), ((3, 5), [(0, 2)])], "do not end with its queries"),
    ],
)
def test_segment_layout_refuses_what_the_kernels_cannot_mean(segments, message):
    with pytest.raises(ValueError, match=message):
        attention.SegmentLayout.from_segments(segments)


# ----------------------------------------------------------------------------- the attention function


SEGMENTS = [
    ((0, 5), [(0, 5)]),
    ((5, 8), [(0, 2), (5, 8)]),
    ((8, 9), [(8, 9)]),
    ((9, 12), [(9, 12)]),
    ((12, 15), [(12, 15)]),
]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("branch", ["sdpa", "varlen"])
def test_attention_equals_attention_by_hand(kv_heads, branch, monkeypatch):
    """Both branches, one segment shape of each kind: plain, shared-prefix (gathered keys), length 1, equal shapes batched."""
    torch.manual_seed(0)
    layout = attention.SegmentLayout.from_segments(SEGMENTS)
    q = torch.randn(1, 4, 15, 8, requires_grad=True)
    k = torch.randn(1, kv_heads, 15, 8, requires_grad=True)
    v = torch.randn(1, kv_heads, 15, 8, requires_grad=True)
    if branch == "varlen":
        monkeypatch.setattr(attention, "runs_on_varlen_kernel", lambda query: True)
        monkeypatch.setattr(attention, "varlen_kernel", lambda: emulated_varlen_attn)
    out, weights = attention.segment_attention(None, q, k, v, None, scaling=0.3, attention_segments=layout)
    assert weights is None and out.shape == (1, 15, 4, 8)
    expected = (
        torch.cat(
            [
                attention_by_hand(
                    q[0], k[0], v[0], list(range(*queries)), [j for start, end in keys for j in range(start, end)], 0.3
                )
                for queries, keys in SEGMENTS
            ],
            dim=1,
        )
        .transpose(0, 1)
        .unsqueeze(0)
    )
    assert torch.allclose(out, expected, atol=1e-6)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_varlen_branch_is_chosen_only_for_cuda_half_precision():
    assert not attention.runs_on_varlen_kernel(torch.zeros(1, dtype=torch.bfloat16))  # CPU
    assert not attention.runs_on_varlen_kernel(torch.zeros(1))


def test_nothing_is_registered_on_import():
    code = (
        "import btrm.attention, btrm.batching; from transformers import AttentionInterface; "
        "assert not [k for k in AttentionInterface._global_mapping if k.startswith('bt_')]"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ----------------------------------------------------------------------------- whole models: every layout equals padded


@pytest.fixture(scope="module", params=["gqa", "mha"])
def reference_model(request, tiny_model_dir):
    """fp32 value-head model with sdpa, never switched to segment attention: the independent reference.

    gqa: the tiny checkpoint itself (4 query heads, 2 kv heads); mha: the same sizes with 4 kv heads.
    """
    from transformers import AutoConfig, Qwen3ForTokenClassification

    from btrm.modeling import load_value_head_model

    torch.manual_seed(3)
    if request.param == "gqa":
        model = load_value_head_model(
            str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
        )
    else:
        config = AutoConfig.from_pretrained(tiny_model_dir, num_key_value_heads=4, num_labels=1)
        config.classifier_dropout = 0.0  # as load_value_head_model sets it: train mode must not drop activations
        model = Qwen3ForTokenClassification._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        torch.nn.init.zeros_(model.score.bias)
        model.score.bias.requires_grad_(False)
    assert (model.config.num_key_value_heads == 2) == (request.param == "gqa")
    torch.nn.init.normal_(model.score.weight, std=1.0)  # rewards of order 1, so differences are visible
    return model.eval()


@pytest.fixture(scope="module")
def segment_model(reference_model):
    model = copy.deepcopy(reference_model)
    assert attention.enable_segment_attention(model) == "bt_segments_over_sdpa"
    return model


LONG_PROMPT = "Explain, step by step and with care, how to plant tomatoes in a small garden bed in spring."


def case_pairs(tokenizer, case):
    """Pairs (token lists, after the chat template) of one kind; the shared prefix each case exercises."""

    def encode(messages):
        return pair_dataset.encode_conversation(tokenizer, messages)

    def pair(chosen, rejected):
        return TokenizedPair(encode(chosen), encode(rejected))

    if case == "single_turn":
        return [
            pair(conv("Tomatoes?", "Water them daily and check the soil."), conv("Tomatoes?", "No.")),
            pair(conv("Hi", "Hello! How can I help?"), conv("Hi", "Go away.")),
        ]
    if case == "multi_turn":
        history = ("How do I start a garden?", "Pick a sunny spot.", "And then?")
        return [
            pair(conv(*history, "Prepare the soil with compost."), conv(*history, "Buy seeds.")),
            pair(
                conv("Hi", "Hello.", "Tell me a joke", "Why did the tomato blush?"),
                conv("Hi", "Hello.", "Tell me a joke", "No."),
            ),
        ]
    if case == "responses_share_leading_tokens":
        return [pair(conv("What is 2+2?", "The answer is four."), conv("What is 2+2?", "The answer is five, I think."))]
    if case == "one_is_prefix_of_other":
        short, longer = conv("Hi", "Hello."), conv("Hi", "Hello.", "More?", "Sure, here is more.")
        assert encode(longer)[: len(encode(short))] == encode(short)
        return [pair(short, longer), pair(longer, short), pair(short, short)]  # short: at most len - 1 shared
    if case in ("left_truncation", "right_truncation"):
        mode = case.split("_")[0]
        chosen, rejected = (
            encode(conv(LONG_PROMPT, "Dig, plant, water.")),
            encode(conv(LONG_PROMPT, "I would not bother with it at all, honestly.")),
        )
        fitted = pair_dataset.truncate_pair(chosen, rejected, max(len(chosen), len(rejected)) - 12, mode, "case")
        assert fitted.dropped_tokens > 0
        return [TokenizedPair(fitted.chosen, fitted.rejected)]
    raise ValueError(case)


CASES = [
    "single_turn",
    "multi_turn",
    "responses_share_leading_tokens",
    "one_is_prefix_of_other",
    "left_truncation",
    "right_truncation",
]


def rewards_loss_grads(model, pairs, layout, pad_token_id):
    model.zero_grad()
    rewards = batching.compute_rewards(model, batching.collate_pairs(pairs, pad_token_id, layout))
    n = len(pairs)
    loss = -F.logsigmoid(rewards[:n] - rewards[n:]).mean()  # the BT loss, written out
    loss.backward()
    return (
        rewards.detach(),
        loss.item(),
        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
    )


def assert_same(candidate, reference):
    (r_c, l_c, g_c), (r_r, l_r, g_r) = candidate, reference
    assert torch.allclose(r_c, r_r, atol=1e-5), (r_c - r_r).abs().max()
    assert l_c == pytest.approx(l_r, abs=1e-5)
    assert g_c.keys() == g_r.keys() and "score.bias" not in g_r
    for name in g_r:
        assert torch.allclose(g_c[name], g_r[name], rtol=1e-4, atol=1e-4 * g_r[name].abs().max().item()), name


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("case", CASES)
def test_layout_rewards_loss_and_grads_equal_padded(reference_model, segment_model, tokenizer, case, layout):
    pairs = case_pairs(tokenizer, case)
    if case != "single_turn" or layout == "shared":
        assert any(p.shared_prefix > 0 for p in pairs)
    reference = rewards_loss_grads(reference_model, pairs, "padded", tokenizer.pad_token_id)
    assert_same(rewards_loss_grads(segment_model, pairs, layout, tokenizer.pad_token_id), reference)


def test_all_cases_in_one_micro_batch_with_gradient_checkpointing(reference_model, tokenizer):
    """Training conditions: one row mixing every case, train mode, activations recomputed in backward."""
    pairs = [p for case in CASES for p in case_pairs(tokenizer, case)]
    reference = rewards_loss_grads(reference_model, pairs, "padded", tokenizer.pad_token_id)
    model = copy.deepcopy(reference_model)
    attention.enable_segment_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for layout in ("packed", "shared"):
        assert_same(rewards_loss_grads(model, pairs, layout, tokenizer.pad_token_id), reference)


@pytest.mark.parametrize("torch_signature", sorted(VARLEN_SIGNATURES))
@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_cuda_branch_arguments_through_emulated_varlen_attn(
    reference_model, segment_model, tokenizer, layout, torch_signature, monkeypatch
):
    """The varlen_attn branch end to end: its q/k/v packing, key gather, cu_seq and max lengths, fed to the emulation
    of varlen_attn as each supported torch defines it (2.11 has no enable_gqa argument)."""
    monkeypatch.setattr(attention, "runs_on_varlen_kernel", lambda query: True)
    calls = []

    def recording_kernel():
        calls.append(1)
        return VARLEN_SIGNATURES[torch_signature]

    monkeypatch.setattr(attention, "varlen_kernel", recording_kernel)
    pairs = [p for case in CASES for p in case_pairs(tokenizer, case)]
    reference = rewards_loss_grads(reference_model, pairs, "padded", tokenizer.pad_token_id)
    assert_same(rewards_loss_grads(segment_model, pairs, layout, tokenizer.pad_token_id), reference)
    assert len(calls) == segment_model.config.num_hidden_layers  # every layer went through the kernel


# ----------------------------------------------------------------------------- the padded path on the same model


@pytest.mark.parametrize("padded_implementation", ["sdpa", "eager"])
def test_padded_forwards_keep_the_models_implementation(tiny_model_dir, tokenizer, padded_implementation):
    from btrm.modeling import load_value_head_model

    torch.manual_seed(5)
    model = load_value_head_model(
        str(tiny_model_dir),
        attn_implementation=padded_implementation,
        torch_dtype=torch.float32,
        trust_remote_code=False,
    ).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    switched = copy.deepcopy(model)
    assert attention.enable_segment_attention(switched) == f"bt_segments_over_{padded_implementation}"
    assert attention.enable_segment_attention(switched) == f"bt_segments_over_{padded_implementation}"  # idempotent
    pairs = case_pairs(tokenizer, "single_turn") + case_pairs(tokenizer, "multi_turn")
    with torch.no_grad():
        for batch in (
            batching.collate_pairs(pairs, tokenizer.pad_token_id, "padded"),
            batching.collate_padded([pairs[0].chosen], tokenizer.pad_token_id),
        ):
            assert torch.equal(batching.compute_rewards(switched, batch), batching.compute_rewards(model, batch))


def test_packed_rows_need_segment_attention(reference_model, segment_model, tokenizer):
    batch = batching.collate_pairs(case_pairs(tokenizer, "single_turn"), tokenizer.pad_token_id, "packed")
    with pytest.raises(ValueError, match="enable_segment_attention"):
        batching.compute_rewards(reference_model, batch)
    with (
        pytest.raises(ValueError, match="without attention_segments"),
        torch.no_grad(),
    ):  # a packed row passed to the model directly
        segment_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
