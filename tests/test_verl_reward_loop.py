"""Newer verl's reward loop (vLLM `/classify`, SGLang `/v1/embeddings`) scores the export exactly as training does.

verl after 0.7 serves a discriminative reward model with vLLM or SGLang and scores a string it renders
itself. Source read: github.com/volcengine/verl at b178a3cd56f58b2d502255daba591e92833930a7
(2026-01-29; `reward_loop.py` there equals v0.7.0's but for a trtllm branch), file
verl/experimental/reward_loop/reward_loop.py:
- `_init_reward_fn` (lines 64-70): `input_tokenizer = hf_tokenizer(actor_rollout_ref.model.path)` (the
  policy's), `reward_model_tokenizer = hf_tokenizer(reward_model.model.path)` (the export's);
- `compute_score_batch` (lines 104-109) passes each row as `data[i : i + 1]`;
- `_preprocess_reward_inputs` (lines 164-198): transcribed verbatim below;
- `compute_score_disrm` (lines 200-220): vLLM `POST /classify` with `{"model", "input": <rendered>,
  "activation": False}` (`"add_special_tokens": False` is commented out, "vllm >= 0.11.2"), reward
  `output["data"][-1]["probs"][-1]`; SGLang `POST /v1/embeddings` with `{"model", "input"}`, reward
  `output["data"][-1]["embedding"][-1]`.
The batch is laid out as verl's `AgentLoopWorker._postprocess` lays out a rollout
(verl/experimental/agent_loop/agent_loop.py lines 546-587: prompts left-padded, responses right-padded,
`attention_mask` the two masks concatenated; a response that stopped ends with the eos id).

The servers, read from their released wheels (vllm 0.12.0, the newest verl's setup.py allows; sglang
0.5.6, verl's pin), with what they do to the rendered string:
- vLLM: `ClassificationCompletionRequest.add_special_tokens` defaults to True
  (vllm/entrypoints/pooling/classify/protocol.py lines 33-39); `_build_render_config` passes it on
  (classify/serving.py lines 174-179) and `_create_prompt_from_text` calls
  `async_tokenizer(text, add_special_tokens=add_special_tokens)` (vllm/entrypoints/renderer.py line 333),
  the HF tokenizer of the served path. The converted `*ForSequenceClassification` pools the LAST token
  (models/interfaces_base.py line 173), applies `score` (no bias, models/adapters.py lines 303-311), then
  the activation when `use_activation` (model_executor/layers/pooler.py lines 609-616): the identity for
  `problem_type: "regression"`, else a sigmoid for one label (lines 103-113). verl's `"activation":
  False` does not turn it off in 0.12.0: `get_use_activation` (vllm/config/pooler.py lines 118-122)
  reads `if activation := getattr(o, "activation", None) is not None:`, which binds `True`; so the
  regression problem type is what keeps the reward raw.
- SGLang: a string `input` becomes `EmbeddingReqInput(text=...)` (sglang/srt/entrypoints/openai/
  serving_embedding.py lines 82-84, 125-130), tokenized as `self.tokenizer([text])["input_ids"][0]`
  (srt/managers/tokenizer_manager.py lines 561-562, 663, 585): special tokens added as vLLM adds
  them. `Qwen3ForSequenceClassification` scores every position and pools LAST, not normalised (the
  config has id2label) (srt/models/qwen3_classification.py lines 45-51, 69-72). Its head is
  `nn.Linear(hidden_size, num_labels)` (line 41): a bias the export does not have, left at its random
  initialisation (see the last test).

No server runs here (no GPU): the export is loaded as `AutoModelForSequenceClassification` in fp32 and
read as the servers read it, and compared with `batching.score()` on the trained value-head model.
"""

from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from test_export import CONVERSATIONS, make_value_head_export

from btrm import batching, export, pair_dataset

if TYPE_CHECKING:
    from verl import DataProto

TOL = 1e-5
PROMPT_LENGTH = 96  # actor_rollout_ref.rollout.prompt_length
RESPONSE_LENGTH = 80  # actor_rollout_ref.rollout.response_length
LLAMA_BOS = "<|begin_of_text|>"


class RewardLoopWorkerStandIn:
    """The two attributes of verl's RewardLoopWorker that `_preprocess_reward_inputs` reads, and that method."""

    def __init__(self, input_tokenizer, reward_model_tokenizer):
        self.input_tokenizer = input_tokenizer
        self.reward_model_tokenizer = reward_model_tokenizer

    # verl/experimental/reward_loop/reward_loop.py lines 164-198 at b178a3cd, verbatim.
    async def _preprocess_reward_inputs(self, data: DataProto) -> str:
        assert len(data) == 1, "RewardLoopWorker only support single data item"
        data_item = data[0]
        assert "raw_prompt" in data_item.non_tensor_batch

        # extract raw prompt
        chat: list = list(data_item.non_tensor_batch["raw_prompt"])

        # extract response
        response_ids = data_item.batch["responses"]
        response_length = response_ids.shape[-1]
        valid_response_length = data_item.batch["attention_mask"][-response_length:].sum()
        valid_response_ids = response_ids[:valid_response_length]

        # decode
        rollout_response = self.input_tokenizer.decode(valid_response_ids)
        # remove bos and eos
        rollout_response = rollout_response.replace(self.input_tokenizer.eos_token, "")

        chat.append({"role": "assistant", "content": rollout_response})

        rm_prompt = self.reward_model_tokenizer.apply_chat_template(
            chat,
            add_generation_prompt=False,
            tokenize=False,
        )

        # llama tokenizer will add bos token by default
        # will be removed in vllm >= 0.11.2, where we can add "add_special_tokens" = False
        if self.reward_model_tokenizer.bos_token is not None and rm_prompt.startswith(
            self.reward_model_tokenizer.bos_token
        ):
            rm_prompt = rm_prompt[len(self.reward_model_tokenizer.bos_token) :]

        return rm_prompt


def rollout_batch(policy_tokenizer, conversations, *, stopped_at_eos: bool) -> DataProto:
    """Prompts and generated responses laid out as AgentLoopWorker._postprocess lays them out.

    The policy generated each conversation's last assistant turn: its tokens, then eos when it stopped
    (vLLM keeps the stop token), none when it ran out of tokens.
    """
    from verl import DataProto

    prompt_ids = [policy_tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True) for c in conversations]
    eos = [policy_tokenizer.eos_token_id] if stopped_at_eos else []
    response_ids = [
        policy_tokenizer(c[-1]["content"], add_special_tokens=False)["input_ids"] + eos for c in conversations
    ]
    padded = {}
    for name, ids, side, length in (
        ("prompts", prompt_ids, "left", PROMPT_LENGTH),
        ("responses", response_ids, "right", RESPONSE_LENGTH),
    ):
        policy_tokenizer.padding_side = side
        padded[name] = policy_tokenizer.pad(
            {"input_ids": ids}, padding="max_length", max_length=length, return_tensors="pt", return_attention_mask=True
        )
    policy_tokenizer.padding_side = "right"
    raw_prompt = np.fromiter((c[:-1] for c in conversations), dtype=object, count=len(conversations))
    return DataProto.from_dict(
        tensors={
            "prompts": padded["prompts"]["input_ids"],
            "responses": padded["responses"]["input_ids"],
            "input_ids": torch.cat([padded["prompts"]["input_ids"], padded["responses"]["input_ids"]], dim=1),
            "attention_mask": torch.cat(
                [padded["prompts"]["attention_mask"], padded["responses"]["attention_mask"]], dim=1
            ),
        },
        non_tensors={"raw_prompt": raw_prompt},
    )


def rendered_strings(worker: RewardLoopWorkerStandIn, batch) -> list[str]:
    return [asyncio.run(worker._preprocess_reward_inputs(batch[i : i + 1])) for i in range(len(batch))]


def vllm_classify_reward(model, tokenizer, text: str) -> float:
    """vLLM's /classify of one text input: tokenize with special tokens, pool LAST, score, activation."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
        pooled = model.score(hidden[:, -1])
    if model.config.problem_type != "regression":  # vLLM applies it although verl sends activation=False
        pooled = torch.sigmoid(pooled)
    return pooled[0, -1].item()  # data[-1].probs[-1]


def sglang_embedding_reward(model, tokenizer, text: str) -> float:
    """SGLang's /v1/embeddings of one text input: tokenize as a batch of one, score every position, pool LAST."""
    ids = tokenizer([text])["input_ids"][0]
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
        scores = model.score(hidden)
    return scores[0, -1, -1].item()  # data[-1].embedding[-1]


def served_model(hf_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.fixture(scope="module")
def chatml(tiny_model_dir, tmp_path_factory):
    """(policy path, export dir, rewards training gives CONVERSATIONS): a Qwen3-style ChatML model, no BOS."""
    from transformers import AutoTokenizer

    value_head, hf_dir = make_value_head_export(tiny_model_dir, tmp_path_factory.mktemp("loop") / "huggingface", seed=2)
    export.export_reward_model(hf_dir)
    trained = batching.score(value_head, AutoTokenizer.from_pretrained(tiny_model_dir), CONVERSATIONS)
    return tiny_model_dir, hf_dir, torch.tensor(trained)


@pytest.fixture(scope="module")
def llama_bos(tiny_model_dir, tmp_path_factory):
    """The same, with a Llama-3-style tokenizer: its chat template writes the BOS text and tokenizing adds BOS."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo.make_tiny_model import CHAT_TEMPLATE

    base = tmp_path_factory.mktemp("bos-base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"bos_token": LLAMA_BOS})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A",
        pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
        special_tokens=[(LLAMA_BOS, tokenizer.bos_token_id)],
    )
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    value_head, hf_dir = make_value_head_export(base, tmp_path_factory.mktemp("bos") / "huggingface", seed=3)
    export.export_reward_model(hf_dir)
    trained = batching.score(value_head, AutoTokenizer.from_pretrained(base), CONVERSATIONS)
    return base, hf_dir, torch.tensor(trained)


def verl_rendering(policy_dir, hf_dir, *, stopped_at_eos: bool = True) -> list[str]:
    """What verl's reward loop sends the server for CONVERSATIONS, its tokenizers loaded as _init_reward_fn loads them."""
    from verl.utils import hf_tokenizer

    worker = RewardLoopWorkerStandIn(hf_tokenizer(str(policy_dir)), hf_tokenizer(str(hf_dir)))
    return rendered_strings(worker, rollout_batch(worker.input_tokenizer, CONVERSATIONS, stopped_at_eos=stopped_at_eos))


@pytest.mark.parametrize("stopped_at_eos", [True, False], ids=["stopped_at_eos", "ran_out_of_tokens"])
def test_vllm_classify_scores_as_training(chatml, stopped_at_eos):
    from transformers import AutoTokenizer

    policy_dir, hf_dir, trained = chatml
    texts = verl_rendering(policy_dir, hf_dir, stopped_at_eos=stopped_at_eos)
    server_tokenizer, model = AutoTokenizer.from_pretrained(hf_dir), served_model(hf_dir)
    assert not any(server_tokenizer.eos_token + server_tokenizer.eos_token in t for t in texts)
    for text, conversation in zip(texts, CONVERSATIONS, strict=True):
        assert server_tokenizer(text)["input_ids"] == pair_dataset.encode_conversation(server_tokenizer, conversation)
    rewards = torch.tensor([vllm_classify_reward(model, server_tokenizer, t) for t in texts])
    difference = (rewards - trained).abs().max().item()
    print(
        f"verl reward loop -> vLLM /classify (stopped_at_eos={stopped_at_eos}) vs score(): max |diff| {difference:.3g}"
    )
    assert difference <= TOL


def test_sglang_embeddings_score_as_training(chatml):
    from transformers import AutoTokenizer

    policy_dir, hf_dir, trained = chatml
    server_tokenizer, model = AutoTokenizer.from_pretrained(hf_dir), served_model(hf_dir)
    rewards = torch.tensor(
        [sglang_embedding_reward(model, server_tokenizer, t) for t in verl_rendering(policy_dir, hf_dir)]
    )
    difference = (rewards - trained).abs().max().item()
    print(f"verl reward loop -> SGLang /v1/embeddings (zero bias) vs score(): max |diff| {difference:.3g}")
    assert difference <= TOL


def test_llama_style_bos_is_stripped_then_added_back_once(llama_bos):
    """verl strips the template's BOS text because the server's tokenizer adds BOS: one BOS, as in training."""
    from transformers import AutoTokenizer

    policy_dir, hf_dir, trained = llama_bos
    texts = verl_rendering(policy_dir, hf_dir)
    server_tokenizer, model = AutoTokenizer.from_pretrained(hf_dir), served_model(hf_dir)
    bos = server_tokenizer.bos_token_id
    for text, conversation in zip(texts, CONVERSATIONS, strict=True):
        ids = server_tokenizer(text, add_special_tokens=True)["input_ids"]
        assert not text.startswith(LLAMA_BOS) and ids[0] == bos and ids.count(bos) == 1
        assert ids == pair_dataset.encode_conversation(server_tokenizer, conversation)
        assert server_tokenizer([text])["input_ids"][0] == ids  # SGLang's call
    rewards = torch.tensor([vllm_classify_reward(model, server_tokenizer, t) for t in texts])
    difference = (rewards - trained).abs().max().item()
    print(f"verl reward loop -> vLLM /classify, Llama-style BOS tokenizer, vs score(): max |diff| {difference:.3g}")
    assert difference <= TOL


def test_policy_eos_must_be_the_token_its_turns_end_with(chatml):
    """verl removes `input_tokenizer.eos_token`'s text only: a policy tokenizer declaring another eos leaves `<|im_end|>` in."""
    from transformers import AutoTokenizer
    from verl.utils import hf_tokenizer

    policy_dir, hf_dir, trained = chatml
    policy_tokenizer = hf_tokenizer(str(policy_dir))
    batch = rollout_batch(policy_tokenizer, CONVERSATIONS, stopped_at_eos=True)  # ends at <|im_end|>
    declares_other_eos = copy.deepcopy(policy_tokenizer)
    declares_other_eos.eos_token = "<|endoftext|>"
    texts = rendered_strings(RewardLoopWorkerStandIn(declares_other_eos, hf_tokenizer(str(hf_dir))), batch)
    assert all(t.endswith("<|im_end|><|im_end|>\n") for t in texts)
    server_tokenizer, model = AutoTokenizer.from_pretrained(hf_dir), served_model(hf_dir)
    rewards = torch.tensor([vllm_classify_reward(model, server_tokenizer, t) for t in texts])
    difference = (rewards - trained).abs()
    print(f"policy eos_token not its turn end: max |diff| {difference.max():.3g}, mean {difference.mean():.3g}")
    assert difference.min() > 100 * TOL


def test_sglang_056_head_adds_its_random_bias_to_every_reward(chatml):
    """sglang 0.5.6 builds `score` with a bias and loads only the checkpoint's tensors: one constant shift."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    policy_dir, hf_dir, trained = chatml
    model = served_model(hf_dir)
    with torch.random.fork_rng():  # a fixed draw, without touching the session's generator
        torch.manual_seed(0)
        head = torch.nn.Linear(model.config.hidden_size, model.config.num_labels)  # qwen3_classification.py line 41
    checkpoint = load_file(str(hf_dir / "model.safetensors"))
    head.load_state_dict(
        {k.removeprefix("score."): v for k, v in checkpoint.items() if k.startswith("score.")}, strict=False
    )
    assert "score.bias" not in checkpoint and head.bias.abs().item() > 100 * TOL
    model.score = head
    server_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rewards = torch.tensor(
        [sglang_embedding_reward(model, server_tokenizer, t) for t in verl_rendering(policy_dir, hf_dir)]
    )
    shift = rewards - trained
    print(
        f"sglang 0.5.6 head: every reward shifted by {shift.mean():.4g} (bias {head.bias.item():.4g}, bound 1/sqrt(hidden) {model.config.hidden_size**-0.5:.3g})"
    )
    assert (shift - head.bias.item()).abs().max() <= TOL
