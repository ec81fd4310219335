"""lora.py: which parameters train, the merge against peft's own merge_and_unload, the adapter
file loaded back by peft. (2-rank LoRA training runs are in test_bt_trainer.py.)"""

import pytest
import torch

from btrm import lora
from btrm.modeling import load_value_head_model


@pytest.fixture()
def value_head_model(tiny_model_dir):
    torch.manual_seed(0)
    return load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )


def lora_model(model, targets="all-linear", rank=4, alpha=8.0, base_dtype=None):
    settings = lora.resolve_settings(model, rank, alpha, targets)
    wrapped = lora.add_lora(model, settings, base_dtype=base_dtype)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); a trained adapter is not
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return wrapped, settings


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky on a clear day."},
    ],
]


def last_token_rewards(model, tokenizer):
    out = []
    with torch.no_grad():
        for conversation in CONVERSATIONS:
            ids = tokenizer.apply_chat_template(conversation, tokenize=True)
            out.append(model(input_ids=torch.tensor([ids])).logits[0, -1, 0].item())
    return torch.tensor(out)


def test_only_adapters_and_the_score_weight_train(value_head_model):
    model, settings = lora_model(value_head_model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable if not n.endswith("score.weight"))
    assert "base_model.model.score.weight" in trainable and "base_model.model.score.bias" not in trainable
    assert settings.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    # every block's linear layers got an adapter; the score head did not
    assert not any("score.lora" in n for n, _ in model.named_parameters())
    adapted = {n.split(".lora_A.")[0] for n in trainable if ".lora_A." in n}
    layers = value_head_model.config.num_hidden_layers
    assert len(adapted) == 7 * layers


def test_bf16_base_keeps_trainable_parameters_in_fp32(value_head_model):
    model, _ = lora_model(value_head_model, base_dtype=torch.bfloat16)
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


def test_settings_refuse_the_score_head_and_unknown_modules(value_head_model):
    with pytest.raises(ValueError, match="score head is always trained in full"):
        lora.resolve_settings(value_head_model, 4, 8, ["q_proj", "score"])
    with pytest.raises(ValueError, match=r"\['qproj'\] not among"):
        lora.resolve_settings(value_head_model, 4, 8, ["qproj"])
    assert lora.resolve_settings(value_head_model, 4, 8, ["q_proj", "v_proj"]).scaling == 2.0


def test_merge_equals_peft_merge_and_unload(value_head_model, tokenizer):
    model, settings = lora_model(value_head_model, targets=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        model.get_base_model().score.weight.normal_(0, 0.1)  # a trained head
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_rewards = last_token_rewards(model, tokenizer)
    merged = lora.merge_lora_state_dict(state, settings.scaling)
    reference = model.merge_and_unload().state_dict()  # peft's own merge
    assert set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6, msg=key)
    # and the merged weights give the adapter model's rewards (fresh model, merged weights loaded strictly)
    plain = load_value_head_model(
        str(value_head_model.config._name_or_path),
        attn_implementation="sdpa",
        torch_dtype=torch.float32,
        trust_remote_code=False,
    )
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(last_token_rewards(plain.eval(), tokenizer), lora_rewards, rtol=0, atol=1e-5)


def test_merge_by_hand_on_a_two_layer_state_dict():
    a, b, w = torch.ones(2, 3), torch.full((4, 2), 0.5), torch.zeros(4, 3)
    state = {
        "base_model.model.layers.0.q.base_layer.weight": w,
        "base_model.model.layers.0.q.lora_A.default.weight": a,
        "base_model.model.layers.0.q.lora_B.default.weight": b,
        "base_model.model.score.weight": torch.ones(1, 4),
    }
    merged = lora.merge_lora_state_dict(state, scaling=3.0)
    assert set(merged) == {"layers.0.q.weight", "score.weight"}
    assert torch.equal(merged["layers.0.q.weight"], torch.full((4, 3), 3.0))  # 3 * (0.5 * 1 + 0.5 * 1)


def test_saved_adapter_loads_in_peft_with_the_trained_head(value_head_model, tokenizer, tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, settings = lora_model(value_head_model, targets=["q_proj", "o_proj"])
    with torch.no_grad():
        model.get_base_model().score.weight.normal_(0, 0.1)
    expected = last_token_rewards(model, tokenizer)
    lora.save_adapter(tmp_path / "adapter", model.state_dict(), settings, base_model=str(tiny_model_dir))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    torch.manual_seed(123)  # a different random head in the base: the adapter must bring its own
    base = load_value_head_model(
        str(tiny_model_dir), attn_implementation="sdpa", torch_dtype=torch.float32, trust_remote_code=False
    )
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(last_token_rewards(loaded, tokenizer), expected, rtol=0, atol=1e-5)


def test_merge_refuses_lora_weights_without_a_base_layer():
    state = {
        "base_model.model.layers.0.q.weight": torch.zeros(4, 3),
        "base_model.model.layers.0.q.lora_A.default.weight": torch.ones(2, 3),
        "base_model.model.layers.0.q.lora_B.default.weight": torch.ones(4, 2),
    }
    with pytest.raises(ValueError, match="without a base layer"):
        lora.merge_lora_state_dict(state, scaling=1.0)


# The checkpointer's LoRA bookkeeping (lora_description, verl's HF export off, resume refusing other
# LoRA settings): tests/test_checkpointer.py.
