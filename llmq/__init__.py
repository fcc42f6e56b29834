"""llmq: a queue-backed job system for LLM inference and evaluation."""
