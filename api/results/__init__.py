"""Reading jobs back: their event streams (replay, then live), the final events non-streamed
responses wait on, and stored log-probabilities in OpenAI's shapes."""
