"""pid → cgroup → pod → identity, and which connections a sidecar meters. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from podtally.ebpf.attribution import (
    PodIndex,
    cgroup_dirs,
    cgroup_path,
    node_identity,
    pod_and_container,
    pod_info,
)
from podtally.ebpf.coverage import EndpointTable, classify, parse_endpoint
from podtally.usage import Identity

UID = "0f5c8a3e-1d2b-4c6d-9e7f-123456789abc"
CID = "a" * 64


@pytest.mark.parametrize("path", [
    # systemd driver, containerd (cgroup v2)
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
    f".slice/cri-containerd-{CID}.scope",
    # cgroupfs driver, docker
    f"/kubepods/besteffort/pod{UID}/{CID}",
    # CRI-O, seen from inside a cgroup namespace
    f"/../../kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope",
], ids=["systemd-containerd", "cgroupfs-docker", "crio-cgroupns"])
def test_cgroup_paths_name_pod_and_container(path: str) -> None:
    assert pod_and_container(path) == (UID, CID)


def test_proc_cgroup_prefers_the_unified_hierarchy() -> None:
    hybrid = ("12:memory:/kubepods/pod" + UID + "/" + CID + "\n"
              "1:name=systemd:/\n0::/kubepods/pod" + UID + "/" + CID + "\n")
    assert cgroup_path(hybrid) == f"/kubepods/pod{UID}/{CID}"
    v1_only = f"4:memory:/user.slice\n3:cpu:/kubepods/pod{UID}/{CID}\n"
    assert cgroup_path(v1_only) == f"/kubepods/pod{UID}/{CID}"
    assert cgroup_path("0::/system.slice/cron.service\n") == "/system.slice/cron.service"
    assert pod_and_container("/system.slice/cron.service") == (None, None)


def pod(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "metadata": {"name": "checkout-7d9f8b6c5-x2x4z", "namespace": "shop", "uid": UID,
                     "labels": {"app.kubernetes.io/name": "checkout", "app": "other",
                                "pod-template-hash": "7d9f8b6c5"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5",
                                          "controller": True}]},
        "spec": {"serviceAccountName": "checkout-sa", "containers": [{"name": "app"}]},
        "status": {"containerStatuses": [{"containerID": f"containerd://{CID}"}]},
    }
    p["spec"].update(over)
    return p


def test_pod_identity_is_the_sidecars() -> None:
    info = pod_info(pod(), {"team": "payments"})
    assert info.identity == Identity(namespace="shop", pod="checkout-7d9f8b6c5-x2x4z",
                                     workload="checkout", team="payments", app="checkout",
                                     service_account="checkout-sa")
    assert not info.has_sidecar and info.container_ids == {CID}
    assert pod_info(pod()).identity.team == "unattributed"


def test_sidecar_pods_and_their_capture_rules() -> None:
    injected = pod(initContainers=[
        {"name": "podtally-init", "command": ["podtally", "init-iptables"],
         "args": ["--proxy-uid=1337", "--ports=443,8080", "--exclude-cidrs=10.0.0.0/8"]},
        {"name": "podtally-sidecar"}])
    info = pod_info(injected)
    assert info.has_sidecar and info.redirect_ports == {443, 8080}
    assert info.redirects("198.18.0.2", 443) and info.redirects("198.18.0.2", 8080)
    assert not info.redirects("198.18.0.2", 80)  # not a captured port
    assert not info.redirects("10.1.2.3", 443)  # excluded
    every_port = pod(initContainers=[{"name": "podtally-init", "args": ["--ports="]},
                                     {"name": "podtally-sidecar"}])
    assert pod_info(every_port).redirects("198.18.0.2", 11434)

    assert classify(1000, info, "198.18.0.2", 443) == "sidecar"
    assert classify(1337, info, "198.18.0.2", 443) == "proxy"
    assert classify(1000, info, "198.18.0.2", 80) == "direct"
    assert classify(1337, pod_info(pod()), "198.18.0.2", 443) == "direct"  # no sidecar
    assert classify(1337, None, "198.18.0.2", 443) == "proxy"  # outside Kubernetes
    assert classify(0, None, "198.18.0.2", 443) == "direct"


def test_pod_index_follows_the_watch() -> None:
    index = PodIndex()
    index.replace([pod()], [{"metadata": {"name": "shop", "labels": {"team": "payments"}}}])
    by_uid = index.lookup(f"/kubepods/pod{UID}/{'b' * 64}")
    by_container = index.lookup(f"/somewhere/{CID}")
    assert by_uid is not None and by_uid == by_container
    assert by_uid.identity.team == "payments"
    index.set_namespace({"metadata": {"name": "shop", "labels": {"team": "checkout-team"}}})
    assert index.lookup(f"/kubepods/pod{UID}").identity.team == "checkout-team"  # type: ignore[union-attr]
    index.delete(pod())
    assert index.lookup(f"/kubepods/pod{UID}") is None and len(index) == 0


def test_node_processes() -> None:
    who = node_identity("curl", "/system.slice/backup.service")
    assert (who.namespace, who.workload, who.app, who.team) == (
        "", "curl", "backup.service", "unattributed")


def test_endpoints() -> None:
    table = EndpointTable([parse_endpoint("198.18.0.0/15:443=openai"),
                           parse_endpoint("10.0.0.7=openai_compatible"),
                           parse_endpoint("[2001:2::/48]:443=anthropic")])
    table.set_resolved({("162.159.140.245", 443): "openai"})
    assert table.provider_for("198.19.1.1", 443) == "openai"
    assert table.provider_for("198.19.1.1", 80) is None
    assert table.provider_for("10.0.0.7", 8000) == "openai_compatible"
    assert table.provider_for("::ffff:10.0.0.7", 8000) == "openai_compatible"
    assert table.provider_for("2001:2::2", 443) == "anthropic"
    assert table.provider_for("162.159.140.245", 443) == "openai"
    for bad in ("198.18.0.2", "198.18.0.2:99999=openai", "nonsense=openai"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_cgroup_dirs_name_each_cgroup_by_its_id(tmp_path: Path) -> None:
    """A process gone before its events are read is found by its cgroup id (the inode)."""
    (tmp_path / "kubepods" / f"pod{UID}" / CID).mkdir(parents=True)
    (tmp_path / "system.slice").mkdir()
    ids = cgroup_dirs(str(tmp_path))
    assert ids[(tmp_path / "kubepods" / f"pod{UID}" / CID).stat().st_ino] == \
        f"/kubepods/pod{UID}/{CID}"
    assert ids[(tmp_path / "system.slice").stat().st_ino] == "/system.slice"
    assert ids[tmp_path.stat().st_ino] == "/"
    assert cgroup_dirs(str(tmp_path / "missing")) == {}
