"""`podtally ebpf-agent`: the node agent. Meters TLS plaintext from OpenSSL without a proxy
(uprobes), and counts connections to LLM endpoints that no sidecar meters (a tracepoint).

Only `podtally.ebpf.loader` imports bcc; everything else here is pure code over events.
"""
