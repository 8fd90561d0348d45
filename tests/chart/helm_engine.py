"""Helm's own engine on the chart: lint, and `helm install` against an in-memory API server.

helm-sdkpy bundles Helm 4's Go code as a shared library; it has lint and install but no
client-only `template`, so rendering is a real install (wait off) into kmock's
KubernetesEmulator: Helm discovers the API, checks kubeVersion, validates the values against
values.schema.json, renders, builds every object against the discovered kinds and creates
them. The release record is kept in Helm's memory driver (HELM_DRIVER=memory), because the
Secret driver speaks protobuf, which the emulator cannot read.

This runs in a child process: Go reads the environment once, when the library is loaded, from
the process' original environment, so HELM_DRIVER and the HELM_*_HOME directories can only be
set by whoever starts the process (run(), below). The child reads a JSON request on stdin and
writes a JSON answer on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# The kinds the chart creates that a bare cluster lacks (Prometheus Operator, cert-manager).
CRD_RESOURCES = {
    "monitoring.coreos.com/v1/podmonitors": "PodMonitor",
    "monitoring.coreos.com/v1/prometheusrules": "PrometheusRule",
    "cert-manager.io/v1/certificates": "Certificate",
    "cert-manager.io/v1/issuers": "Issuer",
}


def run(request: dict[str, Any], workdir: Path, timeout: float = 300) -> dict[str, Any]:
    """Answer `request` in a child process set up for Helm (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))}
    env.update(
        HELM_DRIVER="memory",
        HELM_CACHE_HOME=str(workdir / "cache"),
        HELM_CONFIG_HOME=str(workdir / "config"),
        HELM_DATA_HOME=str(workdir / "data"),
        HOME=str(workdir),  # client-go's discovery cache goes under ~/.kube
    )
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(request), env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"helm engine failed ({proc.returncode}):\n{proc.stderr}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def _emulator_class(kube_version: str) -> type:
    from kmock import KubernetesEmulator

    major, minor, _ = kube_version.split(".")
    version = {"major": major, "minor": minor, "gitVersion": f"v{kube_version}",
               "platform": "linux/amd64"}

    class ApiServer(KubernetesEmulator):  # type: ignore[misc]
        """kmock's emulator, reporting `kube_version`; and /api/v1 says groupVersion "v1"
        (kmock 0.8 answers "/v1", which client-go rejects)."""

        async def _serve_version(self, request: Any) -> Any:
            payload = await super()._serve_version(request)
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
            return payload

        async def _serve_server_version(self, request: Any) -> Any:
            return dict(version)

    return ApiServer


async def _install(chart: str, namespace: str, release: str, values: dict[str, Any],
                   kube_version: str, workdir: Path) -> dict[str, Any]:
    import helm_sdkpy
    from kmock import ResourceInfo, Server

    async with _emulator_class(kube_version)() as api, Server(api) as server:
        api.resources.load_bundled()
        for resource, kind in CRD_RESOURCES.items():
            api.resources[resource] = ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=True,
                verbs=["create", "delete", "get", "list", "patch", "update", "watch"])
        kubeconfig = workdir / f"kubeconfig-{release}.json"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                           "namespace": namespace}}],
        }))
        config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=str(kubeconfig))
        try:
            result = await helm_sdkpy.Install(config).run(release, chart, values=values,
                                                          wait=False, timeout=60)
        except helm_sdkpy.HelmError as exc:
            return {"error": str(exc)}
        objects = [
            {"resource": f"{res.group}/{res.version}/{res.plural}".lstrip("/"),
             "namespace": ns, "name": name, "object": obj.raw}
            for (res, ns, name), obj in api.objects.items() if not obj.deleted
        ]
        return {"manifest": result["manifest"], "notes": result.get("info", {}).get("notes", ""),
                "objects": objects}


async def _lint(chart: str) -> dict[str, Any]:
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace="default")
    lint: dict[str, Any] = await helm_sdkpy.Lint(config).run(chart)
    return lint


async def _main(request: dict[str, Any]) -> dict[str, Any]:
    import helm_sdkpy

    answer: dict[str, Any] = {"helm": helm_sdkpy.get_version(), "renders": {}}
    chart = request["chart"]
    if request.get("lint"):
        answer["lint"] = await _lint(chart)
    with tempfile.TemporaryDirectory() as tmp:
        for case in request["renders"]:
            answer["renders"][case["id"]] = await _install(
                chart, case["namespace"], case["release"], case["values"],
                case.get("kube_version", "1.30.0"), Path(tmp))
    return answer


if __name__ == "__main__":
    json.dump(asyncio.run(_main(json.load(sys.stdin))), sys.stdout)
