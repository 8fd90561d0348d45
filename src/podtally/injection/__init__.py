"""Sidecar injection, pure: decide, resolve the workload, render the template, merge, patch.

Shared by the admission webhook and `podtally inject`; no Kubernetes client in here (owner
lookups the webhook can do are passed in as a callable).
"""
