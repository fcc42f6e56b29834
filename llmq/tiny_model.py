"""The built-in `tiny-llama`: a seeded random Llama and a byte-level BPE tokenizer.

It is written with `save_pretrained` and then loaded through the same `from_pretrained` path as
any real model, so tests exercise real loading code without a model hub.
"""

import os
import shutil
import tempfile
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# A small fixed corpus: the tokenizer's merges depend only on it, so every build is identical.
CORPUS = [
    "Once upon a time there was a little girl named Lily. She liked to play in the park.",
    "The quick brown fox jumps over the lazy dog. The dog was not happy about it.",
    "A queue holds jobs until a worker is ready. Workers run many jobs in one batch.",
    "Tom and his mom went to the store to buy some milk, bread and a big red apple.",
    "The sun was shining and the birds were singing. It was a beautiful day outside.",
    "Language models read tokens and predict the next token, one step at a time.",
    "Ünïcödé text, emoji 🙂 and 漢字 must survive a round trip through the tokenizer.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > ? ! . , ; : ' \"",
]


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The built-in tiny-llama: two layers, 64 wide. A large init spread makes its random output vary
# from prompt to prompt, which gives tests of batching something to tell apart.
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.4,
}


def build_model(vocab_size: int, seed: int = SEED, **shape):  # -> LlamaForCausalLM
    """A seeded random Llama; `shape` overrides TINY_SHAPE's config fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
        **(TINY_SHAPE | shape),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def ensure_tiny_model(path: Path, seed: int = SEED, **shape) -> Path:
    """Write a seeded Llama (tiny-llama unless `shape` says otherwise) and the tokenizer to
    `path` unless they are already there; safe under concurrent callers."""
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(staging)
        build_model(len(tokenizer), seed, **shape).save_pretrained(staging)
        try:
            os.rename(staging, path)  # atomic: readers never see a half-written model
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


if __name__ == "__main__":  # python -m llmq.tiny_model <folder>: what model_files runs
    import sys

    ensure_tiny_model(Path(sys.argv[1]))
