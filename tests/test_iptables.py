"""Unit tests of podtally.iptables: the exact rules, input validation, apply() orchestration."""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from podtally.iptables import (
    IptablesConfig,
    IptablesError,
    apply,
    build_rules,
    has_jump,
    parse_cidrs,
    parse_ports,
)


def test_default_rules_exact() -> None:
    assert build_rules(IptablesConfig()) == (
        "*nat\n"
        ":PODTALLY_OUTPUT - [0:0]\n"
        ":PODTALLY_REDIRECT - [0:0]\n"
        "-F PODTALLY_OUTPUT\n"
        "-F PODTALLY_REDIRECT\n"
        "-A PODTALLY_OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
        "-A PODTALLY_OUTPUT -o lo -j RETURN\n"
        "-A PODTALLY_OUTPUT -d 127.0.0.0/8 -j RETURN\n"
        "-A PODTALLY_OUTPUT -p tcp -m tcp --dport 443 -j PODTALLY_REDIRECT\n"
        "-A PODTALLY_OUTPUT -p tcp -m tcp --dport 80 -j PODTALLY_REDIRECT\n"
        "-A PODTALLY_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"
        "-A OUTPUT -p tcp -j PODTALLY_OUTPUT\n"
        "COMMIT\n"
    )


def test_custom_rules_exact_per_family() -> None:
    cfg = IptablesConfig.model_validate(
        {
            "proxy_uid": 2000,
            "proxy_port": 8443,
            "ports": "8080",
            "exclude_cidrs": "10.0.0.0/8, fd00::/8,192.168.1.7",
        }
    )
    assert cfg == IptablesConfig(
        proxy_uid=2000,
        proxy_port=8443,
        ports=parse_ports("8080"),
        exclude_cidrs=parse_cidrs("10.0.0.0/8, fd00::/8,192.168.1.7"),
    )
    assert build_rules(cfg, add_jump=False) == (
        "*nat\n"
        ":PODTALLY_OUTPUT - [0:0]\n"
        ":PODTALLY_REDIRECT - [0:0]\n"
        "-F PODTALLY_OUTPUT\n"
        "-F PODTALLY_REDIRECT\n"
        "-A PODTALLY_OUTPUT -m owner --uid-owner 2000 -j RETURN\n"
        "-A PODTALLY_OUTPUT -o lo -j RETURN\n"
        "-A PODTALLY_OUTPUT -d 127.0.0.0/8 -j RETURN\n"
        "-A PODTALLY_OUTPUT -d 10.0.0.0/8 -j RETURN\n"
        "-A PODTALLY_OUTPUT -d 192.168.1.7/32 -j RETURN\n"
        "-A PODTALLY_OUTPUT -p tcp -m tcp --dport 8080 -j PODTALLY_REDIRECT\n"
        "-A PODTALLY_REDIRECT -p tcp -j REDIRECT --to-ports 8443\n"
        "COMMIT\n"
    )
    assert build_rules(cfg, family=6) == (
        "*nat\n"
        ":PODTALLY_OUTPUT - [0:0]\n"
        ":PODTALLY_REDIRECT - [0:0]\n"
        "-F PODTALLY_OUTPUT\n"
        "-F PODTALLY_REDIRECT\n"
        "-A PODTALLY_OUTPUT -m owner --uid-owner 2000 -j RETURN\n"
        "-A PODTALLY_OUTPUT -o lo -j RETURN\n"
        "-A PODTALLY_OUTPUT -d ::1/128 -j RETURN\n"
        "-A PODTALLY_OUTPUT -d fd00::/8 -j RETURN\n"
        "-A PODTALLY_OUTPUT -p tcp -m tcp --dport 8080 -j PODTALLY_REDIRECT\n"
        "-A PODTALLY_REDIRECT -p tcp -j REDIRECT --to-ports 8443\n"
        "-A OUTPUT -p tcp -j PODTALLY_OUTPUT\n"
        "COMMIT\n"
    )


def test_empty_ports_redirect_all_tcp() -> None:
    rules = build_rules(IptablesConfig(ports=()))
    assert "--dport" not in rules
    assert "-A PODTALLY_OUTPUT -p tcp -j PODTALLY_REDIRECT\n" in rules
    assert IptablesConfig.model_validate({"ports": ""}).ports == ()
    assert IptablesConfig.model_validate({"ports": []}).ports == ()


def test_build_rules_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        build_rules(IptablesConfig(), family=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("443,80", (443, 80)),
        (" 443 , 80 ,, 443 ,", (443, 80)),
        ("", ()),
        ([8443, "9000"], (8443, 9000)),
        ("1,65535", (1, 65535)),
    ],
)
def test_parse_ports(value: Any, expected: tuple[int, ...]) -> None:
    assert parse_ports(value) == expected
    assert IptablesConfig.model_validate({"ports": value}).ports == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "invalid port 0: must be in 1-65535"),
        ("443,65536", "invalid port 65536: must be in 1-65535"),
        ("https", "invalid port 'https': not an integer"),
        ("-1", "invalid port -1: must be in 1-65535"),
        ([True], "invalid port True: not an integer"),
        ([443.0], "invalid port 443.0: not an integer"),
    ],
)
def test_bad_ports(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_ports(value)
    with pytest.raises(ValueError, match=message):
        IptablesConfig.model_validate({"ports": value})


def test_parse_cidrs() -> None:
    nets = parse_cidrs(" 10.0.0.0/8,fd00::/8,, 192.168.1.7, 10.0.0.0/8 ")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert (
        IptablesConfig.model_validate({"exclude_cidrs": ["10.0.0.0/8"]}).exclude_cidrs == nets[:1]
    )
    assert parse_cidrs("") == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1/8", r"invalid CIDR '10.0.0.1/8': host bits set \(did you mean 10.0.0.0/8\?\)"),
        ("10.0.0.0/33", "invalid CIDR '10.0.0.0/33': not an IPv4/IPv6 network"),
        ("example.com", "invalid CIDR 'example.com': not an IPv4/IPv6 network"),
        ("fd00::1/8", r"host bits set \(did you mean fd00::/8\?\)"),
    ],
)
def test_bad_cidrs(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cidrs(value)
    with pytest.raises(ValueError, match=message):
        IptablesConfig.model_validate({"exclude_cidrs": value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proxy_port": 0}, "invalid proxy port 0: must be in 1-65535"),
        ({"proxy_port": 70000}, "invalid proxy port 70000: must be in 1-65535"),
        ({"proxy_uid": -1}, "invalid proxy uid -1"),
        ({"proxy_uid": 2**32 - 1}, "invalid proxy uid 4294967295"),
        ({"ports": 443}, "invalid ports 443"),
        ({"exclude_cidrs": 10}, "invalid CIDRs 10"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IptablesConfig.model_validate(kwargs)


def test_config_is_frozen_and_documented() -> None:
    cfg = IptablesConfig()
    with pytest.raises(ValueError):
        cfg.proxy_port = 1
    for name, info in IptablesConfig.model_fields.items():
        assert info.description, f"field {name} has no docstring"
    assert IptablesConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_has_jump() -> None:
    assert has_jump("*nat\n-A OUTPUT -p tcp -j PODTALLY_OUTPUT\nCOMMIT\n")
    assert has_jump("-A OUTPUT -j PODTALLY_OUTPUT\n")  # an older/looser jump also counts
    assert not has_jump("*nat\n:PODTALLY_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n")
    assert not has_jump("-A PREROUTING -p tcp -j PODTALLY_OUTPUT\n")


class FakeRunner:
    """Records calls; ``saved`` is what *-save prints, ``fail`` the binaries that fail."""

    def __init__(self, saved: str = "", fail: Sequence[str] = (), missing: Sequence[str] = ()):
        self.saved, self.fail, self.missing = saved, fail, missing
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs["capture_output"] and kwargs["text"] and kwargs["check"] is False
        self.calls.append((list(args), kwargs.get("input")))
        if args[0] in self.missing:
            raise FileNotFoundError(args[0])
        if args[0] in self.fail:
            return subprocess.CompletedProcess(args, 1, "", "can't initialize nat table\n")
        stdout = self.saved if args[0].endswith("-save") else ""
        return subprocess.CompletedProcess(args, 0, stdout, "")


def test_apply_adds_jump_when_missing() -> None:
    runner = FakeRunner()
    cfg = IptablesConfig()
    apply(cfg, runner=runner)
    assert runner.calls == [
        (["iptables-save", "-t", "nat"], None),
        (["iptables-restore", "--noflush", "--wait"], build_rules(cfg)),
        (["ip6tables-save", "-t", "nat"], None),
        (["ip6tables-restore", "--noflush", "--wait"], build_rules(cfg, family=6)),
    ]


def test_apply_keeps_existing_jump() -> None:
    runner = FakeRunner(saved="*nat\n-A OUTPUT -p tcp -j PODTALLY_OUTPUT\nCOMMIT\n")
    cfg = IptablesConfig(ipv6=False)
    apply(cfg, runner=runner)
    assert runner.calls == [
        (["iptables-save", "-t", "nat"], None),
        (["iptables-restore", "--noflush", "--wait"], build_rules(cfg, add_jump=False)),
    ]


def test_apply_ipv4_failure_raises() -> None:
    runner = FakeRunner(fail=["iptables-restore"])
    with pytest.raises(
        IptablesError,
        match="iptables-restore --noflush --wait failed with exit"
        " code 1: can't initialize nat table",
    ):
        apply(IptablesConfig(), runner=runner)
    assert len(runner.calls) == 2  # IPv6 not attempted


def test_apply_missing_binary_names_package() -> None:
    with pytest.raises(IptablesError, match=r"iptables-save not found \(install the iptables"):
        apply(IptablesConfig(), runner=FakeRunner(missing=["iptables-save"]))


@pytest.mark.parametrize("broken", ["ip6tables-save", "ip6tables-restore"])
def test_apply_ipv6_is_best_effort(broken: str, caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(fail=[broken], missing=[])
    with caplog.at_level(logging.WARNING, logger="podtally.iptables"):
        apply(IptablesConfig(), runner=runner)
    assert "IPv6 capture not set up" in caplog.text
    runner = FakeRunner(missing=["ip6tables-save"])
    apply(IptablesConfig(), runner=runner)
