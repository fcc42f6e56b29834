"""Latency samples kept per run, reported as the median over runs of each run's percentile."""

import statistics
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Latencies in seconds, per run."""

    runs: list[list[float]] = field(default_factory=list)

    def percentile(self, q: int) -> float:
        """The median over runs of each run's q-th percentile, in milliseconds."""
        per_run = [statistics.quantiles(run, n=100, method="inclusive")[q - 1] for run in self.runs]
        return statistics.median(per_run) * 1000
