"""The node's pods, from the API server: listed, then watched, into a PodIndex.

Goes through podtally.control.kube (the one module that imports `kubernetes`). A watch
that ends (server timeout, 410 Gone, a network error) is re-opened after a short back-off;
namespaces (their team labels) are re-read each time.
"""

from __future__ import annotations

import logging
import threading

from podtally.control.kube import Kube, KubeError, Watch
from podtally.ebpf.attribution import PodIndex

log = logging.getLogger("podtally.ebpf")


class PodWatcher:
    def __init__(self, kube: Kube, index: PodIndex, *, node: str | None,
                 watch_seconds: int = 300, backoff: float = 2.0) -> None:
        self.kube = kube
        self.index = index
        self.node = node
        self.watch_seconds = watch_seconds
        self.backoff = backoff
        self.synced = threading.Event()
        self.errors = 0
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync_once()
            except (KubeError, OSError) as exc:
                self.errors += 1
                log.warning("pod watch: %s (retrying)", exc)
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad answer
                self.errors += 1
                log.exception("pod watch failed (retrying)")
            self._stop.wait(self.backoff)

    def _sync_once(self) -> None:
        self.index.replace(self.kube.list_pods(node=self.node), self.kube.list_namespaces())
        self.synced.set()
        self._watch = watch = self.kube.watch_pods(node=self.node,
                                                   timeout_seconds=self.watch_seconds)
        for kind, pod in watch:
            if self._stop.is_set():
                return
            if kind == "DELETED":
                self.index.delete(pod)
            elif kind in ("ADDED", "MODIFIED"):
                self.index.upsert(pod)
