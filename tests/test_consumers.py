"""verl 0.6.1 PPO scores an exported checkpoint with verl's own code exactly as training does.

The batch is laid out as verl 0.6.1 lays it out: prompts by verl's `RLHFDataset` (chat template with
generation prompt, left-padded, `raw_prompt` kept with `return_raw_chat=True`) and its `collate_fn`;
responses as `vLLMRollout.generate_sequences` appends them (response ids ending at eos `<|im_end|>`,
right-padded with `pad_2d_list_to_length`, `get_response_mask`, positions continuing the prompt's).
Then verl's `RewardModelWorker.compute_rm_score` runs, which calls its `_switch_chat_template`,
`_forward_micro_batch` and `_expand_to_token_level`: verl's functions, bound to a stand-in object
that carries the attributes they read (a real worker needs ray, NCCL, flash-attn and FSDP, none of
which runs on CPU). The model is loaded as `RewardModelWorker._build_model` loads it
(AutoConfig, num_labels=1, classifier_dropout=0, AutoModelForTokenClassification), in fp32 with sdpa
instead of bf16 with flash_attention_2. Patched, and only for the call:
- `torch.autocast` is turned off (verl's `_forward_micro_batch` hard-codes a bf16 autocast; the bf16
  numbers are measured separately below);
- with `use_remove_padding=True`, verl.utils.attention_utils binds flash_attn's unpad helpers only
  on CUDA: they are replaced by the same-semantics pure-torch ones (transformers' `_unpad_input` /
  `_pad_input`, `index_first_axis(x, i) = x[i]`, a reshape for the one `rearrange` pattern used).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import CONVERSATIONS, make_value_head_export

from btrm import batching, export, pair_dataset

TOL = 1e-5
RESPONSE_LENGTH = 80  # rollout.response_length
MAX_PROMPT_LENGTH = 96  # data.max_prompt_length


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    _, hf_dir = make_value_head_export(tiny_model_dir, tmp_path_factory.mktemp("ppo") / "huggingface", seed=1)
    export.export_reward_model(hf_dir)
    return hf_dir, AutoTokenizer.from_pretrained(hf_dir)


def verl_reward_module(hf_dir, dtype=torch.float32):
    """RewardModelWorker._build_model's loading lines, with sdpa for flash_attention_2."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    model_config = AutoConfig.from_pretrained(hf_dir)
    model_config.num_labels = 1
    model_config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(
        hf_dir, config=model_config, dtype=dtype, attn_implementation="sdpa"
    )
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def ppo_batch(checkpoint, tmp_path_factory):
    """A DataProto as verl 0.6.1's PPO trainer hands it to compute_rm_score (policy tokenizer = RM tokenizer)."""
    import datasets
    import pandas as pd
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.utils.torch_functional import get_response_mask, pad_2d_list_to_length

    _, tokenizer = checkpoint
    tmp = tmp_path_factory.mktemp("ppo-data")
    pd.DataFrame({"prompt": [c[:-1] for c in CONVERSATIONS], "data_source": ["test"] * len(CONVERSATIONS)}).to_parquet(
        tmp / "prompts.parquet"
    )
    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "max_prompt_length": MAX_PROMPT_LENGTH,
            "return_raw_chat": True,
            "truncation": "error",
            "filter_overlong_prompts": False,
            "cache_dir": str(tmp / "verl-cache"),
        }
    )
    with pytest.MonkeyPatch.context() as patch:  # keep the datasets cache out of $HOME
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "hf-datasets"))
        dataset = RLHFDataset(str(tmp / "prompts.parquet"), tokenizer, config)
        batch = collate_fn([dataset[i] for i in range(len(dataset))])

    # vLLMRollout.generate_sequences (verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py): what the
    # policy generated is the assistant turn's tokens followed by eos, right-padded to response_length.
    idx, attention_mask, position_ids = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    generated = [
        tokenizer(c[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for c in CONVERSATIONS
    ]
    assert max(map(len, generated)) <= RESPONSE_LENGTH  # as vLLM's max_tokens guarantees
    response = pad_2d_list_to_length(generated, tokenizer.pad_token_id, max_length=RESPONSE_LENGTH)
    batch_size, response_length = idx.size(0), response.size(1)
    delta_position_id = torch.arange(1, response_length + 1).unsqueeze(0).expand(batch_size, -1)
    position_ids = torch.cat([position_ids, position_ids[..., -1:] + delta_position_id], dim=-1)
    response_attention_mask = get_response_mask(
        response_id=response, eos_token=tokenizer.eos_token_id, dtype=attention_mask.dtype
    )
    attention_mask = torch.cat((attention_mask, response_attention_mask), dim=-1)
    tensors = TensorDict(
        {
            "prompts": idx,
            "responses": response,
            "input_ids": torch.cat([idx, response], dim=-1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        },
        batch_size=batch_size,
    )
    data = DataProto(batch=tensors, non_tensor_batch={k: v for k, v in batch.items() if isinstance(v, np.ndarray)})
    assert isinstance(data.non_tensor_batch["raw_prompt"][0], list)
    assert (idx[:, 0] == tokenizer.pad_token_id).any(), "prompts are left-padded"
    return data


def stand_in_worker(model, tokenizer, *, switch_template: bool, use_remove_padding: bool, micro_batch_size: int = 2):
    """An object with RewardModelWorker's methods and the attributes they read, as __init__/_build_model set them."""
    from omegaconf import OmegaConf
    from verl.workers.fsdp_workers import RewardModelWorker
    from verl.workers.sharding_manager.fsdp_ulysses import FSDPUlyssesShardingManager

    class RewardModelWorkerStandIn:
        compute_rm_score = RewardModelWorker.compute_rm_score
        _switch_chat_template = RewardModelWorker._switch_chat_template
        _forward_micro_batch = RewardModelWorker._forward_micro_batch
        _expand_to_token_level = RewardModelWorker._expand_to_token_level

    worker = RewardModelWorkerStandIn()
    worker.config = OmegaConf.create(
        {"micro_batch_size_per_gpu": micro_batch_size, "use_dynamic_bsz": False, "max_length": None}
    )
    worker.rank, worker.world_size = 0, 1
    worker.reward_module = model
    worker.use_remove_padding = use_remove_padding
    worker.ulysses_sequence_parallel_size = 1
    worker.ulysses_sharding_manager = FSDPUlyssesShardingManager(None)
    worker._do_switch_chat_template = switch_template  # reward_model.model.input_tokenizer set / null
    if switch_template:
        worker.input_tokenizer = tokenizer  # the policy's tokenizer (here the same Qwen3-style ChatML one)
        worker.tokenizer = tokenizer  # the reward model's own
    return worker


def run_compute_rm_score(worker, data, *, fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward per sequence, token-level rm_scores) from verl's compute_rm_score."""
    import verl.utils.attention_utils as attention_utils
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    def rearrange(tensor, pattern):
        assert pattern == "b s ... -> (b s) ...", pattern  # the only pattern a text model reaches
        return tensor.reshape(-1, *tensor.shape[2:])

    real_autocast = torch.autocast

    def autocast_off(device_type, dtype=None, enabled=True, cache_enabled=None):
        return real_autocast(device_type, dtype=dtype, enabled=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            attention_utils,
            "_get_attention_functions",
            lambda: ((lambda x, indices: x[indices]), _pad_input, rearrange, _unpad_input),
        )
        if fp32:
            patch.setattr(torch, "autocast", autocast_off)
        output = worker.compute_rm_score(data)
    scores = output.batch["rm_scores"]
    return scores.float().sum(dim=-1), scores


@pytest.mark.parametrize("use_remove_padding", [False, True], ids=["padded", "remove_padding"])
def test_ppo_with_input_tokenizer_scores_exactly_as_training(checkpoint, ppo_batch, use_remove_padding):
    hf_dir, tokenizer = checkpoint
    model = verl_reward_module(hf_dir)
    worker = stand_in_worker(model, tokenizer, switch_template=True, use_remove_padding=use_remove_padding)
    rewards, token_scores = run_compute_rm_score(worker, ppo_batch)
    expected = torch.tensor(batching.score(export.load_reward_model(hf_dir)[0], tokenizer, CONVERSATIONS))
    difference = (rewards - expected).abs().max().item()
    print(
        f"verl compute_rm_score (input_tokenizer set, use_remove_padding={use_remove_padding}) vs score(): max |diff| {difference:.3g}"
    )
    assert difference < TOL
    # the reward sits on the response's last valid token (its eos), zeros elsewhere, as PPO consumes it
    valid = ppo_batch.batch["attention_mask"][:, -RESPONSE_LENGTH:].sum(-1)
    assert torch.equal((token_scores != 0).nonzero()[:, 1], valid - 1)


def test_ppo_with_null_input_tokenizer_reads_im_end(checkpoint, ppo_batch):
    """input_tokenizer=null scores the policy's raw tokens: the reward of `<|im_end|>`, not of the template's last token."""
    hf_dir, tokenizer = checkpoint
    model = verl_reward_module(hf_dir)
    rewards, _ = run_compute_rm_score(
        stand_in_worker(model, tokenizer, switch_template=False, use_remove_padding=False), ppo_batch
    )

    trained = torch.tensor(batching.score(model, tokenizer, CONVERSATIONS))
    at_im_end = []
    for conversation in CONVERSATIONS:
        ids = pair_dataset.encode_conversation(tokenizer, conversation)
        assert tokenizer.convert_ids_to_tokens(ids[-2:])[0] == "<|im_end|>" and tokenizer.decode(ids[-1:]) == "\n"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits.squeeze(-1)[0]
        at_im_end.append(logits[-2].item())
    assert (rewards - torch.tensor(at_im_end)).abs().max().item() < TOL
    difference = (rewards - trained).abs()
    print(
        f"verl compute_rm_score (input_tokenizer=null) vs score(): max |diff| {difference.max():.3g}, mean {difference.mean():.3g}"
    )
    assert difference.max() > 100 * TOL  # a different token, a different reward


def test_ppo_in_bf16_as_verl_computes(checkpoint, ppo_batch):
    """verl's worker as it runs: bf16 weights and its own bf16 autocast (reported; bf16 rounding only)."""
    hf_dir, tokenizer = checkpoint
    model = verl_reward_module(hf_dir, dtype=torch.bfloat16)
    rewards, _ = run_compute_rm_score(
        stand_in_worker(model, tokenizer, switch_template=True, use_remove_padding=True), ppo_batch, fp32=False
    )
    trained = torch.tensor(batching.score(export.load_reward_model(hf_dir)[0], tokenizer, CONVERSATIONS))
    difference = (rewards - trained).abs().max().item()
    print(
        f"verl compute_rm_score in bf16 (input_tokenizer set) vs fp32 score(): max |diff| {difference:.3g} (rewards up to {trained.abs().max():.3g})"
    )
    assert difference < 0.02 * (1 + trained.abs().max().item())


def test_verl_monkey_patch_needs_verls_trl_pin(checkpoint):
    """RewardModelWorker._build_model calls apply_monkey_patch, which imports a trl class trl 0.29+ no longer exports."""
    trl = pytest.importorskip("trl")
    if hasattr(trl, "AutoModelForCausalLMWithValueHead"):
        pytest.skip(f"trl {trl.__version__} still has AutoModelForCausalLMWithValueHead")
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    hf_dir, _ = checkpoint
    with pytest.raises(ImportError, match="AutoModelForCausalLMWithValueHead"):
        apply_monkey_patch(model=verl_reward_module(hf_dir), use_remove_padding=True, ulysses_sp_size=1)
