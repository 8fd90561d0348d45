"""The operator: the admission webhook, the namespace controller, and their Kubernetes client.

Layers, one sentence each: `desired` and `leader.plan_lease` are pure (what should exist);
`kube` is the only module that imports the `kubernetes` package and speaks plain dicts;
`webhook`, `controller` and `leader` are thin I/O shells over both; `run` wires them up.
"""
