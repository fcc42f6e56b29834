"""Domain errors. The API maps each to an HTTP status in one place (api/http/errors.py).

LlmqError
├── InvalidRequest          400  the request is well-formed but cannot be served as asked
│   ├── PromptTooLong       400  prompt plus max_tokens exceed the model's context
│   ├── PromptTooLarge      400  the prompt has more characters than the server takes
│   ├── InvalidPeriod       400  a usage period runs backwards or is longer than a year
│   ├── ConstraintNotEnforceable 400  a JSON Schema, regex, grammar or tool llguidance refuses
│   ├── TokenOutOfVocabulary 400  a token id the model's tokenizer does not have
│   └── DatasetUnavailable  400  an evaluation's data cannot be read (llmq/evals/datasets.py)
├── AuthenticationFailed    401  no API key, or one that is unknown or revoked
├── PermissionDenied        403  the key's role may not do this (admin endpoints)
├── JobNotFound             404  also another key's job: its existence is not revealed
├── EvalRunNotFound         404
├── ApiKeyNotFound          404
├── ModelNotServed          404  the model is not in the registry
├── SchemaNotFound          404  no named schema of that name for this key
├── WorkerNotFound          404  no live worker of that name answers
├── JobNotCancellable       409  the job already finished
│   └── EvalRunNotCancellable 409  the evaluation run already ended
├── IdempotencyKeyReused    409  the key stored a request with other choices
├── SchemaNameTaken         409  the key has a named schema of that name already
├── WorkerRefused           409  a worker refused a model command (a model it does not serve)
├── TooManyRequests         429  with Retry-After
│   ├── RateLimited         429  the key's requests per minute are spent
│   ├── TooManyConcurrentJobs 429  the key has its most jobs queued or running
│   └── QuotaExceeded       429  the key's monthly token quota is spent
│       └── SpendLimitReached 429  the key's monthly spend limit is reached
└── ServiceUnavailable      503  Postgres, Redis or a model's object store cannot be reached now
    └── ServerBusy          503  too many requests wait for the database in this process
"""


class LlmqError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # added to the HTTP answer

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LlmqError):
    status_code = 400
    error_type = "invalid_request_error"


class ConstraintNotEnforceable(InvalidRequest):
    """An output constraint (JSON Schema, regex, grammar, tool) that cannot be enforced: it is
    invalid, or uses what the grammar engine does not implement."""

    code = "invalid_constraint"


class TokenOutOfVocabulary(InvalidRequest):
    """A token id the model's tokenizer does not have (a prompt's, logit_bias's, ...)."""

    code = "token_out_of_vocabulary"


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


class PromptTooLarge(InvalidRequest):
    code = "prompt_too_large"

    def __init__(self, chars: int, limit: int, param: str = "prompt") -> None:
        super().__init__(
            f"prompt is {chars:,} characters; this server accepts at most {limit:,} "
            "(LLMQ_MAX_PROMPT_CHARS). Shorten the prompt.",
            param=param,
        )


class InvalidPeriod(InvalidRequest):
    code = "invalid_period"


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


class ServerBusy(ServiceUnavailable):
    code = "server_busy"


class SchemaNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"
    code = "schema_not_found"

    def __init__(self, name: str, param: str | None = None) -> None:
        super().__init__(
            f"no named schema {name!r} for this key; store it with POST /v1/schemas", param=param
        )


class SchemaNameTaken(LlmqError):
    status_code = 409
    error_type = "conflict_error"
    code = "schema_name_taken"


class WorkerNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"
    code = "worker_not_found"

    def __init__(self, worker: str, live: list[str]) -> None:
        names = ", ".join(live) or "none"
        super().__init__(
            f"no live worker named {worker!r} answered; live workers: {names} "
            "(GET /v1/admin/workers lists them)"
        )


class WorkerRefused(LlmqError):
    status_code = 409
    error_type = "conflict_error"
    code = "worker_refused"


class EvalRunNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, run_id: object) -> None:
        super().__init__(f"no evaluation run with id {run_id}")


class EvalRunNotCancellable(JobNotCancellable):
    pass


class IdempotencyKeyReused(LlmqError):
    status_code = 409
    error_type = "conflict_error"
    code = "idempotency_key_reused"


class AuthenticationFailed(LlmqError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class PermissionDenied(LlmqError):
    status_code = 403
    error_type = "permission_error"


class ApiKeyNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, key_id: object) -> None:
        super().__init__(f"no API key with id {key_id}")


class TooManyRequests(LlmqError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int, should_retry: bool = True) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, retry_after_s))}
        if not should_retry:  # OpenAI's clients honour this header and give up at once
            self.headers["x-should-retry"] = "false"


class RateLimited(TooManyRequests):
    code = "rate_limit_exceeded"

    def __init__(self, limit: int, reset_s: int) -> None:
        super().__init__(
            f"rate limit reached: this key may send {limit:,} requests per minute; "
            f"retry in {reset_s} s",
            reset_s,
        )


class TooManyConcurrentJobs(TooManyRequests):
    code = "concurrent_jobs_exceeded"

    def __init__(self, in_flight: int, adding: int, limit: int) -> None:
        super().__init__(
            f"this key has {in_flight:,} jobs queued or running and may have {limit:,} at once; "
            f"this request adds {adding:,}. Wait for some to finish, or cancel some.",
            1,
        )


class QuotaExceeded(TooManyRequests):
    """OpenAI's answer to a spent quota: 429 with type and code insufficient_quota."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, used: int, quota: int, month: str, renews_in_s: int) -> None:
        super().__init__(
            f"monthly token quota spent: this key has used {used:,} of its {quota:,} tokens in "
            f"{month} (UTC); it renews at the start of next month, or an admin can raise it",
            renews_in_s,
            should_retry=False,
        )


class SpendLimitReached(QuotaExceeded):
    """A spent monthly spend limit, answered like a spent token quota."""

    def __init__(self, spent: str, limit: str, currency: str, month: str, renews_in_s: int):
        TooManyRequests.__init__(
            self,
            f"monthly spend limit reached: this key has spent {spent} {currency} of its "
            f"{limit} {currency} in {month} (UTC); it renews at the start of next month, or an "
            "admin can raise it",
            renews_in_s,
            should_retry=False,
        )


class FileNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, file_id: object) -> None:
        super().__init__(f"no file with id {file_id}", param="file_id")


class BatchNotFound(LlmqError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, batch_id: object) -> None:
        super().__init__(f"no batch with id {batch_id}", param="batch_id")


class BatchNotCancellable(JobNotCancellable):
    pass
