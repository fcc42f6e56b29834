"""Celery settings, loaded by name: `app.config_from_object("celeryconfig")`.

Every value is chosen for batching LLM jobs that may run for minutes; see the comments.
"""

from llmq.protocol import PRIORITY_STEPS
from llmq.settings import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
broker_connection_retry_on_startup = True
# A worker outlives a broker outage of any length, holding its jobs, and reconnects within about
# 2 s of Redis's return (workers/broker_consumer.py; workers/broker_transport.py says why Celery
# alone would stop it).
broker_connection_max_retries = None
worker_consumer = "workers.broker_consumer:BrokerConsumer"
# Redis redelivers a message that is not acknowledged within visibility_timeout, so it must be
# longer than the longest job (job_time_limit_s) or a long batch would run twice.
broker_transport_options = {
    "visibility_timeout": max(
        _settings.broker_visibility_timeout_s, 2 * _settings.job_time_limit_s
    ),
    # One Redis list per step; workers pop the lowest step first (interactive before batch).
    "priority_steps": list(PRIORITY_STEPS),
}

# Results and job state live in Postgres; Celery's result backend is not used.
task_ignore_result = True
result_backend = None

# Acknowledge a job only after its result is stored, and hand it back if the worker dies.
task_acks_late = True
task_reject_on_worker_lost = True
# SIGTERM is a warm shutdown: the worker finishes the jobs it holds. A cold shutdown (a second
# signal, or SIGQUIT) first gives them this long, then cancels them; their late-ack messages go
# back to the queue, and the reconciler re-runs jobs left marked running.
worker_soft_shutdown_timeout = 30.0
worker_enable_soft_shutdown_on_idle = True
# Each worker thread holds exactly one job; the engine batches across threads. A higher
# multiplier would hide queued jobs behind long ones on a busy worker.
worker_prefetch_multiplier = 1

# The threads pool cannot enforce these; the engine enforces per-job deadlines itself.
task_time_limit = _settings.job_time_limit_s + 60
task_soft_time_limit = _settings.job_time_limit_s + 30

task_create_missing_queues = True
task_default_queue = "llmq.default"
task_serializer = "json"
accept_content = ["json"]

# Flower needs the workers' task events. The API's own "task-sent" events would cost it about a
# tenth of its CPU on the submit path, for a state Postgres already records (queued).
worker_send_task_events = True
task_send_sent_event = False

worker_hijack_root_logger = False
worker_redirect_stdouts = False
