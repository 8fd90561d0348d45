"""The CLI surface of the contract: commands, flags and their errors."""

from __future__ import annotations

from click.testing import CliRunner

from podtally.cli import main


def test_init_iptables_dry_run_prints_the_rules() -> None:
    result = CliRunner().invoke(main, ["init-iptables", "--dry-run", "--proxy-uid", "1337",
                                       "--proxy-port", "15001", "--ports", "443",
                                       "--exclude-cidrs", "10.96.0.0/12"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "*nat" in out and "COMMIT" in out
    assert "--uid-owner 1337 -j RETURN" in out
    assert "-d 10.96.0.0/12 -j RETURN" in out
    assert "--dport 443" in out and "--to-ports 15001" in out


def test_init_iptables_rejects_bad_input() -> None:
    result = CliRunner().invoke(main, ["init-iptables", "--dry-run", "--exclude-cidrs", "10.0.0.1/8"])
    assert result.exit_code != 0 and "10.0.0.1/8" in result.output


def test_sidecar_requires_the_ca() -> None:
    result = CliRunner().invoke(main, ["sidecar"])
    assert result.exit_code != 0 and "--ca-cert" in result.output


def test_sidecar_rejects_bad_llm_host(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    result = CliRunner().invoke(main, ["sidecar", "--ca-cert", str(ca), "--ca-key", str(ca),
                                       "--llm-host", "no-equals-sign"])
    assert result.exit_code != 0 and "HOST=PROVIDER" in result.output
