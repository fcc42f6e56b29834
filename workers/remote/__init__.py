"""Remote models: jobs of a `source: remote` model, taken from its queue like any other and sent
to another OpenAI-compatible server (the upstream), with retries, a shared concurrency limit and
a circuit breaker. A remote model's worker loads no weights and imports no torch."""
