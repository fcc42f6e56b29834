"""Models the benchmarks run: the shared pretrained stories260K, and a seeded ~25M Llama."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def ensure_llama_25m(path: Path) -> Path:
    """A seeded random Llama of about 25M parameters (compute-bound on a CPU) with the tiny
    byte-level tokenizer, written with save_pretrained like any real model."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(25)
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path
