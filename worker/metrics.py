"""Worker metrics (Prometheus); served on `--metrics-port` when given."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("tokenrelay_worker_jobs_total", "Jobs ended, by outcome", ["outcome"])
RUNNING = Gauge("tokenrelay_worker_running_jobs", "Jobs generating now")
TOKENS_AFTER_CANCEL = Histogram(
    "tokenrelay_worker_tokens_after_cancel",
    "Tokens the engine produced after the job's cancel token was set",
    buckets=(0, 1, 2, 4, 8, 16, 64),
)
CANCEL_SIGNALS = Counter(
    "tokenrelay_worker_cancel_signals_total", "Cancel signals received, by source", ["source"]
)
RECLAIMED = Counter("tokenrelay_worker_reclaimed_total", "Jobs taken over from dead workers, by action", ["action"])
