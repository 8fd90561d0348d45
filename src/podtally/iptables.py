"""Traffic capture rules for the podtally sidecar (``podtally init-iptables``).

Runs as root in the pod's network namespace (an injected init container), like Istio's
``istio-init``.  Outbound TCP from every process in the pod, except the proxy itself, is sent
to the proxy's port with a ``nat`` ``REDIRECT``; the proxy recovers the original destination
with ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (``IP6T_SO_ORIGINAL_DST`` for IPv6).

The rules live in podtally's own chains of the ``nat`` table::

    OUTPUT            -p tcp -j PODTALLY_OUTPUT        (added only if no jump exists yet)
    PODTALLY_OUTPUT   -m owner --uid-owner <proxy uid> -j RETURN
                      -o lo -j RETURN
                      -d 127.0.0.0/8 -j RETURN         (::1/128 for IPv6)
                      -d <each excluded CIDR> -j RETURN
                      -p tcp --dport <each port> -j PODTALLY_REDIRECT   (or all TCP)
    PODTALLY_REDIRECT -p tcp -j REDIRECT --to-ports <proxy port>

:func:`build_rules` is pure and returns an ``iptables-restore`` payload; :func:`apply` feeds it
to ``iptables-restore --noflush`` (whichever backend, nft or legacy, the ``iptables``
alternative on the image points at).  Declaring the chains flushes them and the jump from
``OUTPUT`` is only added when missing, so applying twice yields the same rules.

IPv6 is best effort: when :attr:`IptablesConfig.ipv6` is set, the same rules are loaded with
``ip6tables-restore``; if that binary is missing or the kernel refuses (IPv6 disabled, no
``ip6table_nat``), a warning is logged and IPv4 capture still stands.  The proxy must listen
on ``::1`` as well as ``127.0.0.1`` to receive redirected IPv6 connections.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = [
    "OUTPUT_CHAIN",
    "REDIRECT_CHAIN",
    "Family",
    "IptablesConfig",
    "IptablesError",
    "Network",
    "Runner",
    "apply",
    "build_rules",
    "has_jump",
    "parse_cidrs",
    "parse_ports",
]

log = logging.getLogger(__name__)

OUTPUT_CHAIN = "PODTALLY_OUTPUT"
REDIRECT_CHAIN = "PODTALLY_REDIRECT"

_JUMP_RULE = f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_BINARIES = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}

Family = Literal[4, 6]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class IptablesError(RuntimeError):
    """Loading the rules failed (binary missing, or iptables refused the payload)."""


class Runner(Protocol):
    """What :func:`apply` needs from :func:`subprocess.run` (tests wrap it, e.g. in a netns)."""

    def __call__(
        self,
        args: Sequence[str],
        *,
        input: str | None = ...,
        capture_output: bool = ...,
        text: bool = ...,
        check: bool = ...,
    ) -> subprocess.CompletedProcess[Any]: ...


def parse_ports(value: str | Sequence[int | str]) -> tuple[int, ...]:
    """``"443,80"`` (or a sequence) -> ``(443, 80)``; ``""`` -> ``()`` meaning all TCP.

    Blank items are ignored, duplicates dropped (first occurrence kept); raises ``ValueError``
    for anything that is not an integer in 1-65535.
    """
    items: Sequence[int | str] = value.split(",") if isinstance(value, str) else value
    ports: list[int] = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            if not text:
                continue
            try:
                port = int(text, 10)
            except ValueError:
                raise ValueError(f"invalid port {text!r}: not an integer") from None
        elif isinstance(item, int) and not isinstance(item, bool):
            port = item
        else:
            raise ValueError(f"invalid port {item!r}: not an integer")
        if not 1 <= port <= 65535:
            raise ValueError(f"invalid port {port}: must be in 1-65535")
        if port not in ports:
            ports.append(port)
    return tuple(ports)


def parse_cidrs(value: str | Sequence[str | Network]) -> tuple[Network, ...]:
    """``"10.0.0.0/8, fd00::/8"`` (or a sequence) -> networks; a bare address means /32 or /128.

    Blank items are ignored, duplicates dropped; raises ``ValueError`` for an unparsable
    network or one with host bits set (``10.0.0.1/8``), naming the intended network.
    """
    items: Sequence[str | Network] = value.split(",") if isinstance(value, str) else value
    nets: list[Network] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            net: Network = item
        else:
            text = str(item).strip()
            if not text:
                continue
            try:
                net = ipaddress.ip_network(text)
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise ValueError(f"invalid CIDR {text!r}: not an IPv4/IPv6 network") from None
                raise ValueError(
                    f"invalid CIDR {text!r}: host bits set (did you mean {loose}?)"
                ) from None
        if net not in nets:
            nets.append(net)
    return tuple(nets)


class IptablesConfig(BaseModel):
    """Inputs of ``podtally init-iptables``; comma-separated strings are accepted for lists."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    proxy_uid: int = 1337
    """UID the proxy runs as; its own traffic is never redirected (else it would loop)."""

    proxy_port: int = 15001
    """Port the proxy listens on (127.0.0.1 and ::1) for redirected connections."""

    ports: tuple[int, ...] = (443, 80)
    """Destination TCP ports to capture, in order; empty captures all outbound TCP."""

    exclude_cidrs: tuple[Network, ...] = ()
    """Destinations never redirected (IPv4 and IPv6 networks; each goes to its family)."""

    ipv6: bool = True
    """Also program ip6tables, best effort: failures are logged, not raised."""

    @field_validator("proxy_uid")
    @classmethod
    def _check_uid(cls, value: int) -> int:
        if not 0 <= value <= 0xFFFFFFFE:
            raise ValueError(f"invalid proxy uid {value}: must be in 0-4294967294")
        return value

    @field_validator("proxy_port")
    @classmethod
    def _check_proxy_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"invalid proxy port {value}: must be in 1-65535")
        return value

    @field_validator("ports", mode="before")
    @classmethod
    def _parse_ports(cls, value: Any) -> tuple[int, ...]:
        if not isinstance(value, str | Sequence):
            raise ValueError(f"invalid ports {value!r}: expected '443,80' or a list")
        return parse_ports(value)

    @field_validator("exclude_cidrs", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: Any) -> tuple[Network, ...]:
        if not isinstance(value, str | Sequence):
            raise ValueError(f"invalid CIDRs {value!r}: expected '10.0.0.0/8,...' or a list")
        return parse_cidrs(value)


def build_rules(cfg: IptablesConfig, *, family: Family = 4, add_jump: bool = True) -> str:
    """Return the ``iptables-restore --noflush`` payload (nat table) for one address family.

    ``family`` selects the loopback range and which excluded CIDRs apply; ``add_jump=False``
    leaves out the ``OUTPUT -> PODTALLY_OUTPUT`` jump (used by :func:`apply` when it exists).
    """
    if family not in (4, 6):
        raise ValueError(f"invalid family {family!r}: must be 4 or 6")
    lines = [
        "*nat",
        f":{OUTPUT_CHAIN} - [0:0]",
        f":{REDIRECT_CHAIN} - [0:0]",
        f"-F {OUTPUT_CHAIN}",
        f"-F {REDIRECT_CHAIN}",
        f"-A {OUTPUT_CHAIN} -m owner --uid-owner {cfg.proxy_uid} -j RETURN",
        f"-A {OUTPUT_CHAIN} -o lo -j RETURN",
        f"-A {OUTPUT_CHAIN} -d {_LOOPBACK[family]} -j RETURN",
    ]
    lines += [
        f"-A {OUTPUT_CHAIN} -d {net} -j RETURN"
        for net in cfg.exclude_cidrs
        if net.version == family
    ]
    if cfg.ports:
        lines += [
            f"-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j {REDIRECT_CHAIN}"
            for port in cfg.ports
        ]
    else:
        lines.append(f"-A {OUTPUT_CHAIN} -p tcp -j {REDIRECT_CHAIN}")
    lines.append(f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {cfg.proxy_port}")
    if add_jump:
        lines.append(_JUMP_RULE)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def has_jump(saved: str) -> bool:
    """Whether ``iptables-save -t nat`` output already has a jump from OUTPUT to our chain."""
    return any(
        line.startswith("-A OUTPUT ") and line.rstrip().endswith(f"-j {OUTPUT_CHAIN}")
        for line in saved.splitlines()
    )


def _run(runner: Runner, argv: list[str], payload: str | None = None) -> str:
    try:
        res = runner(argv, input=payload, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise IptablesError(f"{argv[0]} not found (install the iptables package)") from None
    if res.returncode != 0:
        err = (res.stderr or res.stdout or "").strip()
        raise IptablesError(f"{' '.join(argv)} failed with exit code {res.returncode}: {err}")
    return str(res.stdout or "")


def _apply_family(cfg: IptablesConfig, family: Family, runner: Runner) -> None:
    save, restore = _BINARIES[family]
    present = has_jump(_run(runner, [save, "-t", "nat"]))
    payload = build_rules(cfg, family=family, add_jump=not present)
    _run(runner, [restore, "--noflush", "--wait"], payload)
    log.info("loaded IPv%d capture rules (jump %s)", family, "kept" if present else "added")


def apply(cfg: IptablesConfig, *, runner: Runner = subprocess.run) -> None:
    """Load the rules into the current network namespace; idempotent; needs CAP_NET_ADMIN.

    IPv4 failures raise :class:`IptablesError`; IPv6 (when ``cfg.ipv6``) only logs a warning.
    """
    _apply_family(cfg, 4, runner)
    if cfg.ipv6:
        try:
            _apply_family(cfg, 6, runner)
        except IptablesError as exc:
            log.warning("IPv6 capture not set up (IPv6 traffic is not metered): %s", exc)
