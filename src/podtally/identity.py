"""Who a sidecar meters for: read once from the pod (env and downward-API files).

Nothing in here looks at traffic, so nothing an app sends can change its attribution.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from podtally.usage import Identity

UNATTRIBUTED = "unattributed"
DEFAULT_TEAM_LABELS = ("team",)
APP_LABELS = ("app.kubernetes.io/name", "app")

# Downward API volume files: one `key="value"` per line, value quoted Go-style.
_LINE = re.compile(r'^(?P<key>[^=\s]+)="(?P<value>(?:[^"\\]|\\.)*)"\s*$')
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def parse_labels(text: str) -> dict[str, str]:
    """Parse the downward API's labels file; lines that do not parse are skipped."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            labels[m["key"]] = re.sub(
                r"\\(.)", lambda e: _ESCAPES.get(e[1], e[0]), m["value"]
            )
    return labels


def read_labels(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        return parse_labels(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def first_present(labels: Mapping[str, str], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = labels.get(key, "").strip()
        if value:
            return value
    return None


def identity_from(
    env: Mapping[str, str],
    labels: Mapping[str, str],
    team_labels: Sequence[str] = DEFAULT_TEAM_LABELS,
) -> Identity:
    """Env from the injected container spec (downward API fieldRefs), labels from the file.

    The team label of the namespace was copied onto the pod at injection, so pod labels
    are the only place to look here.
    """
    pod = env.get("POD_NAME") or "unknown"
    return Identity(
        namespace=env.get("POD_NAMESPACE") or "unknown",
        pod=pod,
        workload=env.get("PODTALLY_WORKLOAD") or pod,
        team=first_present(labels, team_labels) or UNATTRIBUTED,
        app=first_present(labels, APP_LABELS) or "unknown",
        service_account=env.get("POD_SERVICE_ACCOUNT") or "unknown",
    )
