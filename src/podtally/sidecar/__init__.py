"""The per-pod data plane: a mitmproxy-based proxy that meters LLM calls."""
