#!/usr/bin/env python3
"""Build a tiny, randomly initialised Qwen3 causal LM and a real tokenizer, offline.

    python demo/make_tiny_model.py [--output demo/tiny-qwen3]

The result is an ordinary causal-LM checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a ChatML chat template), the same kind of directory
as Qwen/Qwen3-32B, so the demo and the tests exercise exactly the code path of a real run.
The tokenizer is a byte-level BPE trained (with the `tokenizers` library) on the bundled
synthetic demo data; being byte-level it encodes any text. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = DEMO_DIR / "tiny-qwen3"
DEMO_DATA = DEMO_DIR / "helpsteer2_demo.jsonl.gz"

PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen3 uses it (without Qwen3's tool and <think> handling). No BOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_QWEN3 = {  # a few hundred thousand parameters: trains in minutes on 2 CPU cores
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def corpus_texts(data_path: Path = DEMO_DATA) -> list[str]:
    texts = []
    with gzip.open(data_path, "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            texts.extend((row["prompt"], row["response_1"], row["response_2"]))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=TINY_QWEN3["max_position_embeddings"],
    )


def build_tiny_model(output_dir: Path, seed: int = 0, texts: list[str] | None = None, **config_overrides) -> Path:
    """Write a tiny Qwen3ForCausalLM checkpoint + tokenizer to output_dir and return it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer(texts if texts is not None else corpus_texts())
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**TINY_QWEN3, **config_overrides},
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote tiny Qwen3 causal LM + tokenizer to {build_tiny_model(args.output, seed=args.seed)}")


if __name__ == "__main__":
    main()
