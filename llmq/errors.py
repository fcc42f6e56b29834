"""Domain errors. The API maps each to an HTTP status in one place (api/errors.py).

LlmqError
├── InvalidRequest          400  the request is well-formed but cannot be served as asked
│   ├── PromptTooLong       400  prompt plus max_tokens exceed the model's context
│   └── DatasetUnavailable  400  an evaluation's data cannot be read (llmq/evals/datasets.py)
├── JobNotFound             404
├── EvalRunNotFound         404
├── ModelNotServed          404  the model is not in the registry
├── JobNotCancellable       409  the job already finished
│   └── EvalRunNotCancellable 409  the evaluation run already ended
└── ServiceUnavailable      503  Postgres or Redis cannot be reached right now
"""


class LlmqError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LlmqError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens:,} tokens and max_tokens is {max_tokens:,} "
            f"({prompt_tokens + max_tokens:,} in all); this model accepts {context_length:,}. "
            "Shorten the prompt or lower max_tokens.",
            param="prompt",
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class JobNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job with id {job_id}")


class ModelNotServed(LlmqError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"model {model!r} is not served here; available models: {', '.join(served)}",
            param="model",
        )


class JobNotCancellable(LlmqError):
    status_code = 409
    error_type = "conflict_error"


class ServiceUnavailable(LlmqError):
    status_code = 503
    error_type = "service_unavailable"


class EvalRunNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, run_id: object) -> None:
        super().__init__(f"no evaluation run with id {run_id}")


class EvalRunNotCancellable(JobNotCancellable):
    pass
