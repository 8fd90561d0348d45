"""podtally: meters every LLM call a Kubernetes pod makes, attributed by workload identity."""

__version__ = "0.1.0"
