"""From a validated request to stored, queued jobs: prompt token counts and chat templates,
per-key limits, structured output, the completion cache, and the one module that enqueues."""
