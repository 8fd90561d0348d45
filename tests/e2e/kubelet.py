"""THE TEST KUBELET — test scaffolding, documented here and only here.

The end-to-end story (tests/e2e/test_user_story.py) needs something that runs the pods the
API server stores, the way a node would. No container runtime runs on this machine, so this
module plays the node: it takes a Pod *as stored in the API server* (kmock's emulator, after
the admission webhook mutated it) and runs it with real processes, real network namespaces
and real mounts. It reads nothing but the stored spec; nothing in it knows podtally, so what
the webhook gets wrong shows up here as it would on a real node.

What it emulates, precisely:

- **The node's network** (`NodeNetwork`, a bridge CNI): a node network namespace with a bridge
  `cbr0` (198.18.0.1/24); each pod gets its own network namespace, a veth on the bridge and
  the next address of 198.18.0.0/24, default route via the bridge. The node routes to an
  "internet" namespace (198.19.0.2) where LLM providers live. Prometheus runs on the node.
  `dial()` opens a TCP connection from the node (probes, scrapes); `forward()` is
  `kubectl port-forward` for the test, which lives outside the node.
- **DNS**: the pod's `/etc/hosts` (`/etc/netns/<pod>/hosts`, bind-mounted over /etc/hosts by
  `ip netns exec`) holds what kubelet writes there (localhost, the pod's own name and IP,
  `hostAliases`) plus the cluster DNS's answers for the provider host names (→ 198.19.0.2);
  `resolv.conf` has no name servers.
- **The image**: every container's image is this machine's filesystem, with the repository's
  virtualenv first on PATH (so `podtally` and `python` are the console scripts of the venv),
  and a CA store that also trusts the fake provider's CA (real providers' certificates chain
  to public CAs): `/etc/ssl/certs/ca-certificates.crt` and certifi's `cacert.pem` are
  bind-mounted, in the container's mount namespace only, with host CAs + provider CA. The
  image's env is PATH, HOME (the uid's home in /etc/passwd, else `/`), HOSTNAME, LANG.
  `image` and `imagePullPolicy` are otherwise ignored.
- **Volumes** (`spec.volumes`): `secret` and `configMap` (contents fetched from the API
  server; `items`, `defaultMode`/`mode`; a missing object fails the pod, as kubelet would
  keep it in ContainerCreating), `downwardAPI` (`metadata.labels`/`metadata.annotations` in
  kubelet's `key="value"` format, sorted, Go-quoted; `metadata.name`/`namespace`/`uid`),
  `emptyDir` (a directory, mode 0777; `medium: Memory` is not a tmpfs here). With
  `fsGroup`, volume files get that group and the containers that supplementary group.
  Contents are written once, at pod start.
- **Mounts** (`volumeMounts`): each container runs in its own mount and UTS namespaces
  (`unshare --mount --uts`; hostname `spec.hostname`, else the pod name), where each
  volume's host directory is bind-mounted at its `mountPath` (`readOnly` honoured) — so
  argv, env and paths are exactly the spec's, byte for byte. A mount point that does not
  exist in the image is created in an overlay (upper dir per container) over its nearest
  existing parent, never on the host. `readOnlyRootFilesystem: true` remounts every other
  mount read-only. `subPath` is not supported (fails loudly).
- **Env**: the image's env, then `env` in order: `value` and `valueFrom.fieldRef`
  (`metadata.name`, `metadata.namespace`, `metadata.uid`, `metadata.labels['k']`,
  `metadata.annotations['k']`, `spec.serviceAccountName`, `spec.nodeName`, `status.podIP`,
  `status.hostIP`), `secretKeyRef`/`configMapKeyRef`; `$(VAR)` references are expanded in
  env values, `command` and `args` as Kubernetes does.
- **API access from pods**: instead of KUBERNETES_SERVICE_HOST/PORT and a service-account
  token (in-cluster config needs HTTPS; the emulator serves plain HTTP), the service-account
  volume at /var/run/secrets/kubernetes.io/serviceaccount holds a `kubeconfig` for the
  emulator, and every container gets `KUBECONFIG` pointing at it (not with
  `automountServiceAccountToken: false`).
- **Users and privileges** (`securityContext`, container over pod): `runAsUser`/`runAsGroup`
  (group defaults to the passwd entry's, else 0), `runAsNonRoot` (a root container is
  refused), `fsGroup`/`supplementalGroups`, `allowPrivilegeEscalation: false` (no_new_privs),
  `capabilities` (the runtime's default set, minus `drop`, plus `add`: the bounding and
  inheritable sets),
  `privileged`, `readOnlyRootFilesystem`. `seccompProfile` is not applied.
- **Lifecycle**: init containers in order, as root where the spec says so; a regular one must
  exit 0 before the next starts; a native sidecar (init container with `restartPolicy:
  Always`) is started and the next container waits for its `startupProbe` (readiness does
  not gate, as in Kubernetes); then the regular containers. Readiness probes run every
  `periodSeconds` and make the pod Ready. Probes: `httpGet` only (from the node, at the pod
  IP; named ports resolved), with `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`,
  `failureThreshold`, `successThreshold`. A container that exits is restarted when its
  restart policy says so (sidecars always; regular containers under the pod's
  `restartPolicy`), at once (no back-off); a failing `livenessProbe` restarts it too. When
  every regular container of a `restartPolicy: Never/OnFailure` pod has exited, the sidecars
  get SIGTERM in reverse order (SIGKILL after `terminationGracePeriodSeconds`) and the pod is
  Succeeded or Failed. Deleting a pod sends SIGTERM to the regular containers, then to the
  sidecars.
- **Host network**: `Kubelet.run(pod, host_network=True)` runs a pod in this machine's network
  namespace (pod IP 127.0.0.1). The story uses it for the operator, because the API server
  emulator listens on this machine's loopback, which pod namespaces cannot reach.
- **Status**: the kubelet patches `status` in the API server (`phase`, `podIP(s)`, `hostIP`,
  `startTime`, `conditions` Ready/ContainersReady/Initialized, container statuses with
  `restartCount`).
- **Discovery for Prometheus**: a `file_sd` JSON file stands in for Kubernetes service
  discovery, role `pod`: for every container (init ones included, with
  `__meta_kubernetes_pod_container_init="true"`) one target per declared port (one port-less
  target when it declares none), `podIP:port`, with the `__meta_kubernetes_*` labels the
  real discovery attaches (namespace, pod name/IP/uid/phase/ready/host IP/node, labels and
  annotations, controller kind/name, container name/image/init, port name/number/protocol).
  Pods without an IP are left out; pods that ended keep their final phase (as in the API)
  until deleted.
- **Logs**: stdout and stderr of each container run are kept apart
  (`containers/<name>/<n>.stdout|.stderr`, n the restart count), not interleaved as
  `kubectl logs` shows them.
- **`kubectl exec`**: `RunningPod.exec()` enters the container's network and mount
  namespaces (nsenter) and runs a command as the container's user with its env.

Anything in a pod spec this kubelet does not implement fails the pod with the field's name,
rather than being ignored — except what a single node cannot or need not honour, listed in
`IGNORED_*` below (scheduling, resources, image pulling, termination messages, DNS policy).

The container half (`python -m e2e.kubelet container SPEC`) runs as root inside the pod's
network namespace and a new mount namespace, sets up the mounts, then execs `setpriv` into the
container's user and argv: the process keeps its pid, so the kubelet signals the container
itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import pwd
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

POD_NET = ipaddress.ip_network("198.18.0.0/24")
GATEWAY = "198.18.0.1"
NODE_UPLINK, INTERNET_ADDR = "198.19.0.1", "198.19.0.2"
NODE_NAME = "node-1"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# The container runtime's default capabilities (containerd / Docker).
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                "AUDIT_WRITE")

IGNORED_POD_FIELDS = {
    "nodeSelector", "affinity", "tolerations", "topologySpreadConstraints", "priorityClassName",
    "priority", "schedulerName", "imagePullSecrets", "dnsPolicy", "dnsConfig",
    "enableServiceLinks", "automountServiceAccountToken", "serviceAccount",
    "preemptionPolicy", "nodeName",
}
POD_FIELDS = {"containers", "initContainers", "volumes", "serviceAccountName", "restartPolicy",
              "securityContext", "terminationGracePeriodSeconds", "hostAliases", "hostname"}
IGNORED_CONTAINER_FIELDS = {"image", "imagePullPolicy", "resources", "terminationMessagePath",
                            "terminationMessagePolicy"}
CONTAINER_FIELDS = {"name", "command", "args", "env", "ports", "volumeMounts", "securityContext",
                    "readinessProbe", "startupProbe", "livenessProbe", "restartPolicy",
                    "workingDir"}
SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation",
                   "readOnlyRootFilesystem", "capabilities", "privileged", "seccompProfile",
                   "fsGroup", "supplementalGroups"}
PROBE_FIELDS = {"httpGet", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                "failureThreshold", "successThreshold"}


class PodFailed(RuntimeError):
    """The pod could not run as specified (the field or container is named)."""


def _check_fields(what: str, obj: Mapping[str, Any], known: set[str], ignored: set[str]) -> None:
    unknown = set(obj) - known - ignored
    if unknown:
        raise PodFailed(f"{what}: this kubelet does not implement {sorted(unknown)}")


# ------------------------------------------------------------------------ the node network


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class NodeNetwork:
    """The node's network: pods on a bridge, routed to the "internet" namespace."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        from support.netns import netns  # the project's netns helpers: names, cleanup

        self.node = stack.enter_context(netns("ns"))
        self.internet = stack.enter_context(netns("prov"))
        self._next = iter(list(POD_NET.hosts())[1:])
        node, internet = self.node.name, self.internet.name
        _ip("-n", node, "link", "add", "cbr0", "type", "bridge")
        _ip("-n", node, "addr", "add", f"{GATEWAY}/{POD_NET.prefixlen}", "dev", "cbr0")
        _ip("-n", node, "link", "set", "cbr0", "up")
        _ip("-n", node, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
            "netns", internet)
        _ip("-n", node, "addr", "add", f"{NODE_UPLINK}/30", "dev", "uplink")
        _ip("-n", node, "link", "set", "uplink", "up")
        _ip("-n", internet, "addr", "add", f"{INTERNET_ADDR}/30", "dev", "eth0")
        _ip("-n", internet, "link", "set", "eth0", "up")
        _ip("-n", internet, "route", "add", str(POD_NET), "via", NODE_UPLINK)
        self.node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self._requests: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._dialer, name="node-dialer", daemon=True).start()

    def attach(self, pod_netns: str) -> str:
        """Wire a pod's network namespace to the bridge; returns its IP."""
        ip = str(next(self._next))
        host_end = f"veth{ip.rsplit('.', 1)[1]}"
        _ip("-n", pod_netns, "link", "add", "eth0", "type", "veth", "peer", "name", host_end,
            "netns", self.node.name)
        _ip("-n", self.node.name, "link", "set", host_end, "master", "cbr0", "up")
        _ip("-n", pod_netns, "addr", "add", f"{ip}/{POD_NET.prefixlen}", "dev", "eth0")
        _ip("-n", pod_netns, "link", "set", "eth0", "up")
        _ip("-n", pod_netns, "route", "add", "default", "via", GATEWAY)
        return ip

    # A thread that lives in the node's network namespace: sockets it creates are the
    # node's, and once connected they can be used from any thread.
    def _dialer(self) -> None:
        _setns(f"/run/netns/{self.node.name}")
        while True:
            host, port, timeout, box = self._requests.get()
            try:
                box.put(socket.create_connection((host, port), timeout=timeout))
            except OSError as err:
                box.put(err)

    def dial(self, host: str, port: int, timeout: float = 2.0) -> socket.socket:
        box: queue.Queue[Any] = queue.Queue()
        self._requests.put((host, port, timeout, box))
        result = box.get()
        if isinstance(result, OSError):
            raise result
        sock: socket.socket = result
        return sock

    def forward(self, host: str, port: int) -> int:
        """`kubectl port-forward`: a port on this host's loopback, relayed to host:port as
        seen from the node."""
        listener = socket.create_server(("127.0.0.1", 0))
        local_port = int(listener.getsockname()[1])

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        def accept() -> None:
            while True:
                client, _ = listener.accept()
                try:
                    upstream = self.dial(host, port, timeout=5)
                except OSError:
                    client.close()
                    continue
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pump, args=(a, b), daemon=True).start()

        threading.Thread(target=accept, name=f"port-forward-{port}", daemon=True).start()
        return local_port


def http_get(sock: socket.socket, host: str, port: int, path: str,
             timeout: float = 2.0) -> tuple[int, bytes]:
    """A GET over an already connected socket (HTTP/1.0: the body ends with the stream)."""
    sock.settimeout(timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
                     "User-Agent: kube-probe/1.30\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


# ------------------------------------------------------------------------------ the image


@dataclass(frozen=True)
class Image:
    """Every container's image: this machine's filesystem (see the module docstring)."""

    bin_dir: str
    """First on PATH: where `python` and `podtally` resolve."""
    ca_bundle: Path
    """Host CAs + the fake provider's CA, bind-mounted over the image's CA stores."""
    ca_stores: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, directory: Path, extra_cas: bytes) -> Image:
        import certifi
        from support.netns import python_for_uid

        py = python_for_uid(1000)
        if py.origin != "repo-venv":  # a copied venv: its bin/ has no console scripts
            bin_dir = directory / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            (bin_dir / "python").symlink_to(py.executable)
            script = bin_dir / "podtally"
            script.write_text(f"#!{py.executable}\nfrom podtally.cli import main\nmain()\n")
            script.chmod(0o755)
        else:
            bin_dir = Path(py.executable).parent
        directory.mkdir(parents=True, exist_ok=True)
        bundle = directory / "ca-certificates.crt"
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle.write_bytes(system.read_bytes().rstrip(b"\n") + b"\n" + extra_cas)
        bundle.chmod(0o644)
        return cls(str(bin_dir), bundle, (str(system), certifi.where()), dict(py.env))


# ------------------------------------------------------------------------ the API server


class Api:
    """The few API calls a kubelet makes, over plain HTTP to the emulator."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str) -> dict[str, Any] | None:
        resp = self.client.get(path)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return dict(resp.json())

    def patch_status(self, ns: str, name: str, status: Mapping[str, Any]) -> None:
        resp = self.client.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                 json={"status": dict(status)},
                                 headers={"Content-Type": "application/merge-patch+json"})
        resp.raise_for_status()


# ------------------------------------------------------------------------------ helpers


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def go_quote(value: str) -> str:
    """Go's %q for the strings labels can hold (kubelet writes downward-API files so)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def downward_map(values: Mapping[str, str]) -> str:
    return "".join(f"{k}={go_quote(v)}\n" for k, v in sorted(values.items()))


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is a literal `$`,
    anything else stays as written."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(repl, text)


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _field_ref(pod: Mapping[str, Any], path: str, pod_ip: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m[1]) or {}).get(m[2], ""))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.serviceAccountName": spec.get("serviceAccountName"),
        "spec.nodeName": NODE_NAME, "status.podIP": pod_ip, "status.hostIP": NODE_UPLINK,
    }
    if path not in simple:
        raise PodFailed(f"fieldRef {path}: not implemented by this kubelet")
    return str(simple[path] or "")


def _probe_port(container: Mapping[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise PodFailed(f"container {container.get('name')}: probe port {port!r} not declared")


# ------------------------------------------------------------------------------- the pod


@dataclass
class ContainerRun:
    spec: dict[str, Any]
    init: bool
    sidecar: bool  # an init container with restartPolicy Always
    dir: Path
    exec_spec: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = -1
    started: bool = False
    ready: bool = False
    exit_codes: list[int] = field(default_factory=list)
    exited_at: list[float] = field(default_factory=list)  # wall clock, per run
    started_at: float = 0.0

    started_pipes: list[int] = field(default_factory=list)  # read ends, per run

    def exec_time(self, run: int) -> float:
        """Wall-clock time the container's own process was exec'd (its mounts ready)."""
        return float(os.read(self.started_pipes[run], 64) or b"nan")

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def stdout(self, run: int | None = None) -> str:
        n = self.restarts if run is None else run
        return (self.dir / f"{n}.stdout").read_text(errors="replace")

    def stderr(self, run: int | None = None) -> str:
        n = self.restarts if run is None else run
        return (self.dir / f"{n}.stderr").read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RunningPod:
    """One pod on this node; its lifecycle runs on a thread of its own."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any], host_network: bool) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.name, self.namespace = str(meta["name"]), str(meta["namespace"])
        self.host_network = host_network
        self.hostname = str(pod["spec"].get("hostname") or self.name)
        self.ip = ""
        self.netns: Any = None
        self.dir = Path()
        self.phase = "Pending"
        self.error: BaseException | None = None
        self.events: list[str] = []
        self.terminating = False
        self.grace: float | None = None
        self.start_time = now_rfc3339()
        self.containers: dict[str, ContainerRun] = {}
        self._changed = threading.Condition()
        self._stack = contextlib.ExitStack()
        self.thread = threading.Thread(target=self._main, name=f"pod-{self.name}", daemon=True)

    # -- what the test sees --------------------------------------------------------------

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic():.3f} {text}")
        self.kubelet.log(f"kubelet: {self.namespace}/{self.name}: {text}")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                if self.error is not None:
                    raise PodFailed(f"{self.namespace}/{self.name}: {self.error}\n"
                                    f"{self.diagnostics()}") from self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.namespace}/{self.name}: not {what} after "
                                       f"{timeout}s (phase {self.phase})\n{self.diagnostics()}")
                self._changed.wait(min(left, 0.2))

    def wait_running(self, timeout: float = 60) -> None:
        self.wait(lambda: self.phase == "Running" and all(
            c.started for c in self.containers.values() if not c.init), timeout, "Running")

    def wait_done(self, timeout: float = 60) -> str:
        self.wait(lambda: self.phase in ("Succeeded", "Failed"), timeout, "finished")
        return self.phase

    def container(self, name: str) -> ContainerRun:
        return self.containers[name]

    def is_ready(self, name: str) -> bool:
        run = self.containers.get(name)
        return run is not None and run.ready

    def diagnostics(self) -> str:
        out = [f"events of {self.namespace}/{self.name}:", *self.events]
        for c in self.containers.values():
            for n in range(max(c.restarts, 0) + 1):
                for stream in ("stdout", "stderr"):
                    path = c.dir / f"{n}.{stream}"
                    if path.exists():
                        text = path.read_text(errors="replace")[-3000:]
                        out.append(f"--- {c.name} run {n} {stream} ---\n{text}")
        return "\n".join(out)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> RunningPod:
        self.thread.start()
        return self

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - surfaced to whoever waits
            self.error = err
            self.event(f"FAILED: {err}")
            self.phase = "Failed"
            self._stop_all(grace=2)
            self._publish()
        finally:
            self._notify()

    def _run(self) -> None:
        spec = self.pod["spec"]
        _check_fields("pod spec", spec, POD_FIELDS, IGNORED_POD_FIELDS)
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            _check_fields(f"container {c.get('name')}", c, CONTAINER_FIELDS,
                          IGNORED_CONTAINER_FIELDS)
            _check_fields(f"container {c.get('name')} securityContext",
                          c.get("securityContext") or {}, SECURITY_FIELDS, set())
            for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
                if probe in c:
                    _check_fields(f"container {c['name']} {probe}", c[probe], PROBE_FIELDS, set())
        _check_fields("pod securityContext", spec.get("securityContext") or {},
                      SECURITY_FIELDS, set())

        # The sandbox: network namespace (or the host's), address, hosts file.
        if self.host_network:
            self.ip = "127.0.0.1"
            self.dir = self.kubelet.workdir / f"{self.namespace}_{self.name}"
            self.dir.mkdir(parents=True, mode=0o755)
        else:
            from support.netns import netns

            self.netns = self._stack.enter_context(netns("pod"))
            self.dir = self.netns.workdir
            self.ip = self.kubelet.network.attach(self.netns.name)
            self._write_hosts()
        self.event(f"sandbox ready, pod IP {self.ip}")
        self._publish()

        # Volumes, then containers in Kubernetes' order.
        volumes = self._materialise_volumes()
        for c in spec.get("initContainers", []):
            sidecar = c.get("restartPolicy") == "Always"
            run = self._container(c, init=True, sidecar=sidecar, volumes=volumes)
            if sidecar:
                self._start(run)
                self._await_startup(run)
            else:
                self._start(run)
                assert run.proc is not None
                code = run.proc.wait(timeout=120)
                run.exit_codes.append(code)
                self.event(f"init container {run.name} exited {code}")
                if code != 0:
                    raise PodFailed(f"init container {run.name} exited {code}:\n"
                                    f"{run.stdout()}\n{run.stderr()}")
        mains = [self._container(c, init=False, sidecar=False, volumes=volumes)
                 for c in spec.get("containers", [])]
        for run in mains:
            self._start(run)
            self._await_startup(run)
        self.phase = "Running"
        self._publish()
        self._supervise(mains)

    def _supervise(self, mains: list[ContainerRun]) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        probes: dict[tuple[str, str], list[float]] = {}
        while not self.terminating:
            for run in self.containers.values():
                if run.init and not run.sidecar:
                    continue
                code = self._reap(run)
                if code is None:
                    continue
                run.ready = False
                self.event(f"container {run.name} exited {code}")
                if run.sidecar or policy == "Always" or (policy == "OnFailure" and code != 0):
                    self._start(run)
                    self._await_startup(run)
                self._publish()
            if policy != "Always" and all(not r.running() for r in mains):
                self._finish(mains)
                return
            self._probe_all(probes)
            time.sleep(0.05)
        # `delete()`: regular containers first, then the sidecars in reverse order. Done on
        # this thread: the containers die with the thread that started them (pdeathsig).
        for run in [r for r in self.containers.values() if not r.init]:
            self._terminate(run, self.grace)
        for run in reversed([r for r in self.containers.values() if r.sidecar]):
            self._terminate(run, self.grace)
        if self.phase not in ("Succeeded", "Failed"):
            self.phase = "Succeeded"

    @staticmethod
    def _reap(run: ContainerRun) -> int | None:
        """The exit code of the current run if it ended and was not recorded yet."""
        if run.proc is None or run.proc.poll() is None or len(run.exit_codes) > run.restarts:
            return None
        run.exit_codes.append(run.proc.returncode)
        run.exited_at.append(time.time())
        return run.proc.returncode

    def _finish(self, mains: list[ContainerRun]) -> None:
        for run in mains:
            self._reap(run)
        sidecars = [r for r in self.containers.values() if r.sidecar]
        for run in reversed(sidecars):
            self.event(f"regular containers done: SIGTERM to sidecar {run.name}")
            self._terminate(run)
        ok = all(r.proc is not None and r.proc.returncode == 0 for r in mains)
        self.phase = "Succeeded" if ok else "Failed"
        self.event(f"pod {self.phase}")
        self._publish()

    def _terminate(self, run: ContainerRun, grace: float | None = None) -> None:
        if grace is None:
            grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        if not run.running():
            self._reap(run)
            return
        assert run.proc is not None
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
            self.event(f"container {run.name} killed after the grace period")
        code = self._reap(run)
        self.event(f"container {run.name} exited {code} {time.monotonic() - t0:.1f}s after "
                   "SIGTERM")

    def delete(self, grace: float | None = None, timeout: float = 60) -> None:
        """`kubectl delete pod`: SIGTERM to the regular containers, then to the sidecars."""
        self.grace = grace
        self.terminating = True
        self.thread.join(timeout=timeout)
        self._publish(deleted=True)
        self._stack.close()

    def _stop_all(self, grace: float) -> None:
        for run in self.containers.values():
            with contextlib.suppress(Exception):
                self._terminate(run, grace)

    def kill(self, container: str, sig: int = signal.SIGKILL) -> None:
        """Signal the container's process (as the OOM killer or `kill` on the node would)."""
        proc = self.containers[container].proc
        assert proc is not None
        self.event(f"container {container} gets signal {signal.Signals(sig).name}")
        proc.send_signal(sig)

    # -- containers ----------------------------------------------------------------------

    def _container(self, c: dict[str, Any], *, init: bool, sidecar: bool,
                   volumes: Mapping[str, Path]) -> ContainerRun:
        run = ContainerRun(dict(c), init, sidecar, self.dir / "containers" / c["name"])
        run.dir.mkdir(parents=True, exist_ok=True)
        run.exec_spec = self._exec_spec(c, volumes, run.dir)
        self.containers[run.name] = run
        return run

    def _exec_spec(self, c: Mapping[str, Any], volumes: Mapping[str, Path],
                   scratch: Path) -> dict[str, Any]:
        spec = self.pod["spec"]
        psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}

        def sc(key: str, default: Any = None) -> Any:
            return csc.get(key, psc.get(key, default))

        uid = int(sc("runAsUser", 0))
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
        except KeyError:
            entry = None
        gid = int(sc("runAsGroup", entry.pw_gid if entry else 0))
        if sc("runAsNonRoot") and uid == 0:
            raise PodFailed(f"container {c['name']}: runAsNonRoot and the user is root "
                            "(CreateContainerConfigError)")
        groups = [int(g) for g in psc.get("supplementalGroups", [])]
        if "fsGroup" in psc:
            groups.append(int(psc["fsGroup"]))
        privileged = bool(csc.get("privileged"))
        caps = None
        if not privileged:
            capsec = csc.get("capabilities") or {}
            drop = {str(x).upper() for x in capsec.get("drop", [])}
            add = {str(x).upper() for x in capsec.get("add", [])}
            base = set() if "ALL" in drop else set(DEFAULT_CAPS) - drop
            caps = sorted(base | add)

        env: dict[str, str] = {
            "PATH": f"{self.kubelet.image.bin_dir}:{SYS_PATH}",
            "HOSTNAME": self.hostname,
            "HOME": entry.pw_dir if entry else "/",
            "LANG": "C.UTF-8",
            **self.kubelet.image.env,
        }
        automount = spec.get("automountServiceAccountToken", True)
        if automount:
            env["KUBECONFIG"] = f"{SA_DIR}/kubeconfig"
        for item in c.get("env", []):
            name = str(item["name"])
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
            elif "valueFrom" in item:
                env[name] = self._env_from(item["valueFrom"])
            else:
                env[name] = ""
        argv = [expand(str(a), env) for a in [*c.get("command", []), *c.get("args", [])]]
        if not c.get("command"):
            raise PodFailed(f"container {c['name']}: no command (images have no entrypoint "
                            "here)")

        mounts = []
        for m in c.get("volumeMounts", []):
            if m.get("subPath") or m.get("subPathExpr"):
                raise PodFailed(f"container {c['name']}: subPath is not implemented")
            if m["name"] not in volumes:
                raise PodFailed(f"container {c['name']}: volume {m['name']} not in the pod")
            bin_dir = Path(self.kubelet.image.bin_dir)
            if bin_dir.is_relative_to(m["mountPath"]):
                # The image is this machine's filesystem: a volume over the checkout hides
                # `python` and `podtally` from the container, as it would in a real image.
                raise PodFailed(f"container {c['name']}: volume {m['name']} at "
                                f"{m['mountPath']} would hide the image's {bin_dir}; run the "
                                "tests from a checkout outside it (e.g. not under /tmp)")
            mounts.append({"source": str(volumes[m["name"]]), "target": m["mountPath"],
                           "readonly": bool(m.get("readOnly"))})
        if automount:
            mounts.append({"source": str(self.kubelet.kubeconfig.parent), "target": SA_DIR,
                           "readonly": True})
        image_files = [{"source": str(self.kubelet.image.ca_bundle), "target": t}
                       for t in self.kubelet.image.ca_stores]
        return {"argv": argv, "env": env, "cwd": c.get("workingDir", "/"), "uid": uid,
                "gid": gid, "groups": groups, "caps": caps,
                "no_new_privs": csc.get("allowPrivilegeEscalation") is False,
                "read_only_root": bool(sc("readOnlyRootFilesystem", False)),
                "mounts": mounts, "image_files": image_files, "hostname": self.hostname,
                "scratch": str(scratch)}

    def _env_from(self, source: Mapping[str, Any]) -> str:
        if "fieldRef" in source:
            return _field_ref(self.pod, str(source["fieldRef"]["fieldPath"]), self.ip)
        for key, resource in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if key in source:
                ref = source[key]
                obj = self.kubelet.api.get(
                    f"/api/v1/namespaces/{self.namespace}/{resource}/{ref['name']}") or {}
                value = (obj.get("data") or {}).get(ref["key"])
                if value is None:
                    if ref.get("optional"):
                        return ""
                    raise PodFailed(f"{key} {ref['name']}/{ref['key']} not found")
                if resource == "secrets":
                    import base64

                    return base64.b64decode(value).decode()
                return str(value)
        raise PodFailed(f"env valueFrom {sorted(source)}: not implemented by this kubelet")

    def _start(self, run: ContainerRun) -> None:
        run.restarts += 1
        run.started = False
        spec_file = run.dir / f"{run.restarts}.spec.json"
        read_end, write_end = os.pipe()
        run.started_pipes.append(read_end)
        spec_file.write_text(json.dumps({**run.exec_spec, "started_fd": write_end}, indent=1))
        helper = [sys.executable, "-m", "e2e.kubelet", "container", str(spec_file)]
        prefix = ["unshare", "--mount", "--uts", "--propagation", "private"]
        argv = [*prefix, *helper] if self.netns is None else [
            "ip", "netns", "exec", self.netns.name, *prefix, *helper]
        out = (run.dir / f"{run.restarts}.stdout").open("wb")
        err = (run.dir / f"{run.restarts}.stderr").open("wb")
        run.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env={"PATH": SYS_PATH, "PYTHONPATH": str(TESTS)},
                                    start_new_session=True, pass_fds=(write_end,))
        os.close(write_end)
        out.close()
        err.close()
        run.started_at = time.monotonic()
        kind = "sidecar" if run.sidecar else "init container" if run.init else "container"
        again = f" (restart {run.restarts})" if run.restarts else ""
        self.event(f"started {kind} {run.name}{again} as uid {run.exec_spec['uid']}: "
                   f"{' '.join(run.exec_spec['argv'])}")
        self._publish()

    # -- probes --------------------------------------------------------------------------

    def probe(self, run: ContainerRun, probe: Mapping[str, Any]) -> tuple[bool, str]:
        get = probe.get("httpGet")
        if get is None:
            raise PodFailed(f"container {run.name}: only httpGet probes are implemented")
        if str(get.get("scheme", "HTTP")).upper() != "HTTP" or get.get("httpHeaders"):
            raise PodFailed(f"container {run.name}: probe {get}: not implemented")
        port = _probe_port(run.spec, get["port"])
        host = get.get("host") or self.ip
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if self.host_network:
                sock = socket.create_connection((host, port), timeout=timeout)
            else:
                sock = self.kubelet.network.dial(host, port, timeout=timeout)
            status, _ = http_get(sock, host, port, get.get("path", "/"), timeout)
        except OSError as err:
            return False, f"{type(err).__name__}"
        return 200 <= status < 400, str(status)

    def _await_startup(self, run: ContainerRun) -> None:
        probe = run.spec.get("startupProbe")
        if probe is not None:
            period = float(probe.get("periodSeconds", 10))
            threshold = int(probe.get("failureThreshold", 3))
            time.sleep(float(probe.get("initialDelaySeconds", 0)))
            for _ in range(threshold):
                if not run.running():
                    raise PodFailed(f"{run.name} exited during its startup:\n{run.stderr()}")
                ok, detail = self.probe(run, probe)
                if ok:
                    break
                time.sleep(period)
            else:
                raise PodFailed(f"{run.name}: startupProbe failed {threshold} times "
                                f"(last: {detail})\n{run.stderr()}")
        run.started = True
        what = f"startupProbe {probe['httpGet'].get('path')} {detail}" if probe else "running"
        note = ""
        if "readinessProbe" in run.spec:  # kubelet starts readiness probing now, too
            ok, state = self.probe(run, run.spec["readinessProbe"])
            run.ready = ok
            note = f"; readinessProbe {run.spec['readinessProbe']['httpGet'].get('path')} " \
                   f"answers {state} at this moment"
        self.event(f"{run.name} started ({what}, {time.monotonic() - run.started_at:.1f}s "
                   f"after start){note}: next container may start")
        self._publish()

    def _probe_all(self, state: dict[tuple[str, str], list[float]]) -> None:
        """Readiness and liveness, every periodSeconds, with their thresholds."""
        changed = False
        now = time.monotonic()
        for run in self.containers.values():
            if (run.init and not run.sidecar) or not run.running() or not run.started:
                continue
            if "readinessProbe" not in run.spec and run.ready is not True:
                run.ready, changed = True, True
            for kind in ("readinessProbe", "livenessProbe"):
                probe = run.spec.get(kind)
                if probe is None:
                    continue
                st = state.setdefault((run.name, kind), [0.0, 0, 0])  # last, fails, successes
                if now - st[0] < float(probe.get("periodSeconds", 10)):
                    continue
                st[0] = now
                ok, detail = self.probe(run, probe)
                st[1], st[2] = (0, st[2] + 1) if ok else (st[1] + 1, 0)
                if kind == "readinessProbe":
                    if ok and not run.ready and st[2] >= int(probe.get("successThreshold", 1)):
                        run.ready, changed = True, True
                    elif not ok and run.ready and st[1] >= int(probe.get("failureThreshold", 3)):
                        run.ready, changed = False, True
                elif st[1] >= int(probe.get("failureThreshold", 3)):
                    self.event(f"{run.name}: livenessProbe failed ({detail}): restarting")
                    st[1] = 0
                    self._terminate(run)
        if changed:
            self._publish()

    # -- volumes, hosts ------------------------------------------------------------------

    def _write_hosts(self) -> None:
        etc = Path("/etc/netns") / self.netns.name
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["# Kubernetes-managed hosts file (the test kubelet).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{self.ip}\t{self.hostname}"]
        for alias in self.pod["spec"].get("hostAliases", []):
            lines.append(f"{alias['ip']}\t{' '.join(alias['hostnames'])}")
        lines.append("# The cluster DNS's answers for the LLM providers (the fake provider).")
        lines += [f"{addr}\t{name}" for name, addr in self.kubelet.dns.items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("# no name servers: nothing resolves outside\n"
                                         "options timeout:1 attempts:1\n")
        for f in ("hosts", "resolv.conf"):
            (etc / f).chmod(0o644)

    def _materialise_volumes(self) -> dict[str, Path]:
        spec = self.pod["spec"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        root = self.dir / "volumes"
        root.mkdir(mode=0o755)
        out: dict[str, Path] = {}
        for vol in spec.get("volumes", []):
            name = vol["name"]
            d = root / name
            d.mkdir(mode=0o755)
            kinds = set(vol) - {"name"}
            if kinds == {"emptyDir"}:
                d.chmod(0o777)
            elif kinds == {"secret"} or kinds == {"configMap"}:
                self._project_object(vol, d)
            elif kinds == {"downwardAPI"}:
                for item in vol["downwardAPI"].get("items", []):
                    ref = item.get("fieldRef")
                    if ref is None:
                        raise PodFailed(f"volume {name}: only fieldRef items are implemented")
                    path = ref["fieldPath"]
                    meta = self.pod["metadata"]
                    if path in ("metadata.labels", "metadata.annotations"):
                        text = downward_map(meta.get(path.split(".")[1]) or {})
                    else:
                        text = _field_ref(self.pod, path, self.ip)
                    self._write(d, item["path"], text.encode(),
                                item.get("mode", vol["downwardAPI"].get("defaultMode", 0o644)))
            else:
                raise PodFailed(f"volume {name}: {sorted(kinds)} not implemented")
            if fs_group is not None:
                for p in [d, *d.rglob("*")]:
                    os.chown(p, -1, int(fs_group))
            out[name] = d
        self.event(f"volumes ready: {', '.join(out) or 'none'}")
        return out

    def _project_object(self, vol: Mapping[str, Any], d: Path) -> None:
        kind = "secret" if "secret" in vol else "configMap"
        src = vol[kind]
        obj_name = src["secretName"] if kind == "secret" else src["name"]
        resource = "secrets" if kind == "secret" else "configmaps"
        obj = self.kubelet.api.get(f"/api/v1/namespaces/{self.namespace}/{resource}/{obj_name}")
        if obj is None:
            if src.get("optional"):
                return
            raise PodFailed(f"volume {vol['name']}: {kind} {self.namespace}/{obj_name} not found "
                            "(the pod would stay in ContainerCreating)")
        data: dict[str, bytes] = {}
        import base64

        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v) if kind == "secret" else str(v).encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
        default_mode = int(src.get("defaultMode", 0o644))
        items = src.get("items") or [{"key": k, "path": k} for k in sorted(data)]
        for item in items:
            if item["key"] not in data:
                raise PodFailed(f"volume {vol['name']}: key {item['key']} not in {obj_name}")
            self._write(d, item["path"], data[item["key"]], int(item.get("mode", default_mode)))

    @staticmethod
    def _write(d: Path, rel: str, data: bytes, mode: int) -> None:
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)

    # -- status and discovery --------------------------------------------------------------

    def _publish(self, deleted: bool = False) -> None:
        self._notify()
        ready = self.phase == "Running" and all(
            c.ready for c in self.containers.values() if not c.init or c.sidecar) and all(
            c.started for c in self.containers.values() if not c.init)

        def status_of(run: ContainerRun) -> dict[str, Any]:
            state: dict[str, Any] = ({"running": {}} if run.running() else
                                     {"terminated": {"exitCode": run.exit_codes[-1]}}
                                     if run.exit_codes else {"waiting": {}})
            return {"name": run.name, "ready": run.ready, "started": run.started,
                    "restartCount": max(run.restarts, 0), "state": state,
                    "image": run.spec.get("image", "")}

        status: dict[str, Any] = {
            "phase": self.phase, "hostIP": NODE_UPLINK, "startTime": self.start_time,
            "conditions": [
                {"type": "Initialized", "status": "True" if self.phase != "Pending" else "False"},
                {"type": "ContainersReady", "status": str(ready)},
                {"type": "Ready", "status": str(ready)},
            ],
            "initContainerStatuses": [status_of(c) for c in self.containers.values() if c.init],
            "containerStatuses": [status_of(c) for c in self.containers.values() if not c.init],
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if not deleted:
            with contextlib.suppress(Exception):
                self.kubelet.api.patch_status(self.namespace, self.name, status)
        self.kubelet.update_targets(self, ready, deleted)

    # -- kubectl exec ----------------------------------------------------------------------

    def exec(self, container: str, argv: Sequence[str], timeout: float = 60,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`kubectl exec POD -c CONTAINER -- argv`: in the container's namespaces, as its
        user, with its env."""
        run = self.containers[container]
        assert run.running() and run.proc is not None, f"{container} is not running"
        spec = run.exec_spec
        setpriv = _setpriv_argv(spec)
        res = subprocess.run(
            ["nsenter", f"--target={run.proc.pid}", "--mount", "--uts", "--net",
             f"--wd={spec['cwd']}", *setpriv, *argv],
            env={**spec["env"], **(env or {})}, capture_output=True, text=True,
            timeout=timeout, check=False)
        self.event(f"exec in {container}: {' '.join(argv)} -> exit {res.returncode}")
        return res


# ----------------------------------------------------------------------------- the kubelet


class Kubelet:
    def __init__(self, *, api_url: str, network: NodeNetwork, workdir: Path, image: Image,
                 dns: Mapping[str, str], file_sd: Path, kubeconfig: Path,
                 log: Callable[[str], None] = print) -> None:
        self.api = Api(api_url)
        self.network = network
        self.workdir = workdir
        self.image = image
        self.dns = dict(dns)
        self.file_sd = file_sd
        self.kubeconfig = kubeconfig
        self.log = log
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self._targets: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._write_targets()

    def run(self, pod: Mapping[str, Any], *, host_network: bool = False) -> RunningPod:
        """Run a pod as stored in the API server (fetched again: what is stored is what runs)."""
        meta = pod["metadata"]
        stored = self.api.get(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
        if stored is None:
            raise PodFailed(f"pod {meta['namespace']}/{meta['name']} is not in the API server")
        running = RunningPod(self, stored, host_network)
        self.pods[(running.namespace, running.name)] = running
        return running.start()

    def shutdown(self) -> None:
        for pod in list(self.pods.values()):
            with contextlib.suppress(Exception):
                pod.delete(grace=5)

    # -- file_sd: the pod role of Kubernetes service discovery --------------------------

    def update_targets(self, pod: RunningPod, ready: bool, deleted: bool) -> None:
        key = (pod.namespace, pod.name)
        groups: list[dict[str, Any]] = []
        if pod.ip and not deleted and not pod.host_network:
            meta = pod.pod["metadata"]
            common = {
                "__meta_kubernetes_namespace": pod.namespace,
                "__meta_kubernetes_pod_name": pod.name,
                "__meta_kubernetes_pod_ip": pod.ip,
                "__meta_kubernetes_pod_uid": str(meta.get("uid", "")),
                "__meta_kubernetes_pod_phase": pod.phase,
                "__meta_kubernetes_pod_ready": str(ready).lower(),
                "__meta_kubernetes_pod_node_name": NODE_NAME,
                "__meta_kubernetes_pod_host_ip": NODE_UPLINK,
            }
            for kind in ("label", "annotation"):
                for k, v in (meta.get(f"{kind}s") or {}).items():
                    common[f"__meta_kubernetes_pod_{kind}_{_sanitize(k)}"] = str(v)
                    common[f"__meta_kubernetes_pod_{kind}present_{_sanitize(k)}"] = "true"
            for ref in meta.get("ownerReferences") or []:
                if ref.get("controller"):
                    common["__meta_kubernetes_pod_controller_kind"] = ref["kind"]
                    common["__meta_kubernetes_pod_controller_name"] = ref["name"]
            spec = pod.pod["spec"]
            for init, containers in ((True, spec.get("initContainers", [])),
                                     (False, spec.get("containers", []))):
                for c in containers:
                    labels = {**common, "__meta_kubernetes_pod_container_name": c["name"],
                              "__meta_kubernetes_pod_container_image": c.get("image", ""),
                              "__meta_kubernetes_pod_container_init": str(init).lower()}
                    ports = c.get("ports") or []
                    if not ports:
                        groups.append({"targets": [pod.ip], "labels": labels})
                    for p in ports:
                        groups.append({"targets": [f"{pod.ip}:{p['containerPort']}"], "labels": {
                            **labels,
                            "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                            "__meta_kubernetes_pod_container_port_number":
                                str(p["containerPort"]),
                            "__meta_kubernetes_pod_container_port_protocol":
                                p.get("protocol", "TCP")}})
        with self._lock:
            if groups:
                self._targets[key] = groups
            else:
                self._targets.pop(key, None)
            self._write_targets()

    def _write_targets(self) -> None:
        tmp = self.file_sd.with_name(f".{self.file_sd.name}.tmp")
        tmp.write_text(json.dumps([g for gs in self._targets.values() for g in gs], indent=1))
        tmp.chmod(0o644)
        tmp.replace(self.file_sd)


# ------------------------------------------------------------- the container half (root)


def _setpriv_argv(spec: Mapping[str, Any]) -> list[str]:
    argv = ["setpriv", f"--reuid={spec['uid']}", f"--regid={spec['gid']}"]
    argv.append(f"--groups={','.join(map(str, spec['groups']))}" if spec["groups"]
                else "--clear-groups")
    if spec["no_new_privs"]:
        argv.append("--no-new-privs")
    if spec["caps"] is not None:
        caps = ",".join(["-all", *(f"+{c.lower()}" for c in spec["caps"])])
        argv += [f"--bounding-set={caps}", f"--inh-caps={caps}"]
        if spec["uid"] != 0:
            argv.append("--ambient-caps=-all")
    # The parent-death signal after the uid switch (the kernel clears it on that change).
    return [*argv, "--", "setpriv", "--pdeathsig=KILL", "--"]


_NON_DISK = {"proc", "sysfs", "nsfs", "cgroup", "cgroup2", "bpf", "tracefs", "debugfs",
             "securityfs", "fusectl", "configfs", "binfmt_misc", "autofs", "mqueue",
             "hugetlbfs", "pstore", "devpts", "devtmpfs", "efivarfs", "rpc_pipefs"}


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of this mount namespace, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = re.sub(r"\\(\d{3})", lambda m: chr(int(m[1], 8)), left.split()[4])
        out.append((point, right.split()[0]))
    return out


def _sh(*argv: str, fds: Sequence[int] = ()) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                         pass_fds=tuple(fds))
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _ensure(target: Path, is_dir: bool, scratch: Path, overlaid: set[Path]) -> None:
    """Make a mount point exist in the image without touching the host: an overlay (upper
    dir in scratch) over the nearest existing parent, its sub-mounts bound again on top."""
    if target.exists():
        return
    base = target.parent
    while not base.exists():
        base = base.parent
    if base not in overlaid and not any(base.is_relative_to(o) for o in overlaid):
        tag = _sanitize(str(base)) or "root"
        upper, work, snap = (scratch / f"ovl-{tag}-{x}" for x in ("upper", "work", "snap"))
        for d in (upper, work, snap):
            d.mkdir(parents=True, exist_ok=True)
        subs = [p for p, _ in _mounts() if Path(p).is_relative_to(base) and Path(p) != base]
        _sh("mount", "--rbind", str(base), str(snap))
        _sh("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={base},upperdir={upper},workdir={work}", str(base))
        for p in subs:
            rel = Path(p).relative_to(base)
            with contextlib.suppress(RuntimeError):
                _sh("mount", "--bind", str(snap / rel), p)
        _sh("umount", "--recursive", "--lazy", str(snap))
        overlaid.add(base)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


def container_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    scratch = Path(spec["scratch"]) / "rootfs"
    scratch.mkdir(parents=True, exist_ok=True)
    socket.sethostname(spec["hostname"])  # in the container's own UTS namespace
    overlaid: set[Path] = set()
    for f in spec["image_files"]:
        _ensure(Path(f["target"]), False, scratch, overlaid)
    for m in spec["mounts"]:
        _ensure(Path(m["target"]), Path(m["source"]).is_dir(), scratch, overlaid)
    # Sources are held open (O_PATH) from before the first mount: a volume mounted at, say,
    # /tmp must not hide another volume's source directory under /tmp.
    held = {x["source"]: os.open(x["source"], os.O_PATH)
            for x in [*spec["image_files"], *spec["mounts"]]}

    def bind(source: str, target: str) -> None:
        fd = held[source]
        _sh("mount", "--bind", f"/proc/self/fd/{fd}", target, fds=[fd])

    for f in spec["image_files"]:
        bind(f["source"], f["target"])
        _sh("mount", "-o", "remount,bind,ro", f["target"])
    volume_points = set()
    for m in sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts)):
        bind(m["source"], m["target"])
        if m["readonly"]:
            _sh("mount", "-o", "remount,bind,ro", m["target"])
        volume_points.add(m["target"])
    if spec["read_only_root"]:
        points = dict(_mounts())  # the last (top) mount at each point is the visible one
        for point, fstype in points.items():
            if point in volume_points or point.startswith(("/proc", "/sys", "/dev")) or \
                    not os.path.lexists(point):  # shadowed by a later mount: unreachable
                continue
            try:
                _sh("mount", "-o", "remount,bind,ro", point)
            except RuntimeError:
                # The node's own runtime state (/run/netns: namespaces of other pods) and
                # pseudo file systems are no part of an image.
                if fstype not in _NON_DISK and not point.startswith("/run/netns") and \
                        not os.statvfs(point).f_flag & os.ST_RDONLY:
                    raise
    for fd in held.values():
        os.close(fd)
    os.chdir(spec["cwd"])
    argv = [*_setpriv_argv(spec), *spec["argv"]]
    os.write(spec["started_fd"], f"{time.time():.6f}".encode())  # for the kubelet's records
    os.close(spec["started_fd"])
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "container":
        sys.exit(container_main(sys.argv[2]))
    sys.exit("usage: python -m e2e.kubelet container SPEC.json")

