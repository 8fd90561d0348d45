from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from podtally import certs

UTC = dt.UTC
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _verify_server(
    ca_pem: bytes, leaf: x509.Certificate, name: str, when: dt.datetime | None = None
) -> list[x509.Certificate]:
    """Path-validate ``leaf`` for ``name`` (DNS name or IP) against ``ca_pem`` as the only root."""
    subject: x509.DNSName | x509.IPAddress
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    builder = PolicyBuilder().store(Store([_load(ca_pem)]))
    if when is not None:
        builder = builder.time(when)
    return builder.build_server_verifier(subject).verify(leaf, [])


def _tls_handshake(server_cert: Path, server_key: Path, ca_pem: bytes, host: str) -> str:
    """In-memory TLS handshake (no sockets); returns the negotiated version."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(server_cert, server_key)
    cctx = ssl.create_default_context(cadata=ca_pem.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    version = client.version()
    assert version is not None
    return version


# --- generate_ca --------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_generate_ca_is_a_proper_ca(key_type: certs.KeyType) -> None:
    cert_pem, key_pem = certs.generate_ca(
        "podtally ns-a", valid_days=30, key_type=key_type, now=NOW
    )
    cert = _load(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert cert.public_key() == key.public_key()

    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "podtally ns-a"
    cert.verify_directly_issued_by(cert)  # self-signed

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())

    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=30)
    assert cert.not_valid_before_utc < NOW
    assert cert.serial_number > 0


def test_generate_ca_key_types() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _, ec_key = certs.generate_ca("a", valid_days=1, key_type="ec")
    _, rsa_key = certs.generate_ca("a", valid_days=1, key_type="rsa")
    assert isinstance(serialization.load_pem_private_key(ec_key, None), ec.EllipticCurvePrivateKey)
    rk = serialization.load_pem_private_key(rsa_key, None)
    assert isinstance(rk, rsa.RSAPrivateKey) and rk.key_size == 2048
    with pytest.raises(ValueError):
        certs.generate_ca("a", valid_days=1, key_type="dsa")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        certs.generate_ca("a", valid_days=0)


def test_generate_ca_rejects_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        certs.generate_ca("a", valid_days=1, now=dt.datetime(2025, 1, 1))


# --- issue_server_cert --------------------------------------------------------------------


@pytest.mark.parametrize(("ca_type", "leaf_type"), [("ec", "ec"), ("rsa", "rsa"), ("rsa", "ec")])
def test_issue_server_cert_chains_to_ca(ca_type: certs.KeyType, leaf_type: certs.KeyType) -> None:
    ca_pem, ca_key = certs.generate_ca("provider CA", valid_days=365, key_type=ca_type)
    names = ["api.openai.com", "api.anthropic.com", "*.openai.azure.com"]
    leaf_pem, leaf_key = certs.issue_server_cert(
        ca_pem, ca_key, names, ["127.0.0.1", ipaddress.ip_address("::1")], key_type=leaf_type
    )
    leaf = _load(leaf_pem)
    ca = _load(ca_pem)
    assert serialization.load_pem_private_key(leaf_key, None).public_key() == leaf.public_key()

    leaf.verify_directly_issued_by(ca)
    assert leaf.issuer == ca.subject

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf_ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert leaf_ski.digest != ca_ski.digest

    # Full RFC 5280 / CABF path validation with cryptography's verifier.
    for name in ["api.openai.com", "api.anthropic.com", "x.openai.azure.com", "127.0.0.1", "::1"]:
        chain = _verify_server(ca_pem, leaf, name)
        assert chain == [leaf, ca]
    with pytest.raises(VerificationError):
        _verify_server(ca_pem, leaf, "evil.example.com")
    other_ca, _ = certs.generate_ca("other", valid_days=1)
    with pytest.raises(VerificationError):
        _verify_server(other_ca, leaf, "api.openai.com")


def test_issue_server_cert_tls_handshake(tmp_path: Path) -> None:
    ca_pem, ca_key = certs.generate_ca("provider CA", valid_days=365)
    leaf_pem, leaf_key = certs.issue_server_cert(ca_pem, ca_key, ["api.openai.com"])
    (tmp_path / "c.pem").write_bytes(leaf_pem)
    (tmp_path / "k.pem").write_bytes(leaf_key)
    assert _tls_handshake(tmp_path / "c.pem", tmp_path / "k.pem", ca_pem, "api.openai.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tmp_path / "c.pem", tmp_path / "k.pem", ca_pem, "api.anthropic.com")


def test_issue_server_cert_validity_is_clamped_to_ca() -> None:
    ca_pem, ca_key = certs.generate_ca("ca", valid_days=10, now=NOW)
    leaf = _load(certs.issue_server_cert(ca_pem, ca_key, ["a.test"], valid_days=90, now=NOW)[0])
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=10)
    leaf = _load(certs.issue_server_cert(ca_pem, ca_key, ["a.test"], valid_days=3, now=NOW)[0])
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=3)
    assert leaf.not_valid_before_utc >= _load(ca_pem).not_valid_before_utc
    # Verifiable at NOW, not after expiry.
    _verify_server(ca_pem, leaf, "a.test", when=NOW)
    with pytest.raises(VerificationError):
        _verify_server(ca_pem, leaf, "a.test", when=NOW + dt.timedelta(days=4))


def test_issue_server_cert_ip_only_and_errors() -> None:
    ca_pem, ca_key = certs.generate_ca("ca", valid_days=10)
    leaf = _load(certs.issue_server_cert(ca_pem, ca_key, [], ["127.0.0.2"])[0])
    assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "127.0.0.2"
    _verify_server(ca_pem, leaf, "127.0.0.2")
    with pytest.raises(ValueError):
        certs.issue_server_cert(ca_pem, ca_key, [])
    _, other_key = certs.generate_ca("other", valid_days=1)
    with pytest.raises(ValueError, match="does not match"):
        certs.issue_server_cert(ca_pem, other_key, ["a.test"])


# --- expiry / rotation --------------------------------------------------------------------


def test_cert_not_after_is_aware_utc_and_accepts_key_plus_cert() -> None:
    ca_pem, ca_key = certs.generate_ca("ca", valid_days=7, now=NOW)
    expected = NOW + dt.timedelta(days=7)
    assert certs.cert_not_after(ca_pem) == expected
    assert certs.cert_not_after(ca_pem).tzinfo is not None
    # mitmproxy-ca.pem layout: key first, then cert.
    assert certs.cert_not_after(ca_key + ca_pem) == expected


def test_needs_rotation() -> None:
    ca_pem, _ = certs.generate_ca("ca", valid_days=30, now=NOW)
    week = dt.timedelta(days=7)
    assert not certs.needs_rotation(ca_pem, NOW, week)
    assert not certs.needs_rotation(ca_pem, NOW + dt.timedelta(days=23), week)  # exactly 7d left
    assert certs.needs_rotation(ca_pem, NOW + dt.timedelta(days=23, seconds=1), week)
    assert certs.needs_rotation(ca_pem, NOW + dt.timedelta(days=31), week)  # expired
    assert certs.needs_rotation(ca_pem, NOW + dt.timedelta(days=31), dt.timedelta(0))
    assert not certs.needs_rotation(ca_pem, NOW, dt.timedelta(days=29, hours=23))
    assert certs.needs_rotation(ca_pem, NOW, dt.timedelta(days=31))
    # Other time zones compare correctly.
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert not certs.needs_rotation(ca_pem, (NOW + dt.timedelta(days=23)).astimezone(plus2), week)
    with pytest.raises(ValueError):
        certs.needs_rotation(ca_pem, dt.datetime(2025, 6, 1), week)


# --- mitmproxy confdir --------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_write_mitmproxy_confdir_is_loaded_by_mitmproxy(
    tmp_path: Path, key_type: certs.KeyType
) -> None:
    from mitmproxy.certs import DEFAULT_DHPARAM, CertStore

    ca_pem, ca_key = certs.generate_ca("podtally ns-a", valid_days=365, key_type=key_type)
    confdir = tmp_path / "conf" / "mitmproxy"
    certs.write_mitmproxy_confdir(ca_pem, ca_key, confdir)

    files = {p.name for p in confdir.iterdir()}
    assert files == {
        "mitmproxy-ca.pem",
        "mitmproxy-ca-cert.pem",
        "mitmproxy-ca-cert.cer",
        "mitmproxy-ca-cert.p12",
        "mitmproxy-dhparam.pem",
    }
    assert stat.S_IMODE((confdir / "mitmproxy-ca.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((confdir / "mitmproxy-ca-cert.pem").stat().st_mode) == 0o644
    assert b"PRIVATE KEY" not in (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    combined = (confdir / "mitmproxy-ca.pem").read_bytes()
    assert combined.index(b"PRIVATE KEY") < combined.index(b"BEGIN CERTIFICATE")
    assert _load((confdir / "mitmproxy-ca-cert.pem").read_bytes()) == _load(ca_pem)
    assert (confdir / "mitmproxy-dhparam.pem").read_bytes().strip() == DEFAULT_DHPARAM.strip()

    before = _snapshot(confdir)
    store = CertStore.from_store(confdir, "mitmproxy", 2048)
    # mitmproxy neither generated a CA of its own nor wrote anything into the confdir.
    assert _snapshot(confdir) == before
    assert store.default_ca._cert == _load(ca_pem)
    assert store.default_privatekey.public_key() == _load(ca_pem).public_key()

    entry = store.get_cert("api.openai.com", [x509.DNSName("api.openai.com")])
    leaf = entry.cert._cert
    leaf.verify_directly_issued_by(_load(ca_pem))
    chain = _verify_server(ca_pem, leaf, "api.openai.com")
    assert chain[-1] == _load(ca_pem)

    # And a real TLS client trusting only our CA accepts mitmproxy's leaf.
    leaf_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert _tls_handshake(leaf_file, key_file, ca_pem, "api.openai.com")


def test_write_mitmproxy_confdir_rotation_replaces_ca(tmp_path: Path) -> None:
    from mitmproxy.certs import CertStore

    old_pem, old_key = certs.generate_ca("old", valid_days=1)
    new_pem, new_key = certs.generate_ca("new", valid_days=10)
    certs.write_mitmproxy_confdir(old_pem, old_key, tmp_path)
    certs.write_mitmproxy_confdir(new_pem, new_key, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    store = CertStore.from_store(tmp_path, "mitmproxy", 2048)
    assert store.default_ca._cert == _load(new_pem)


def test_write_mitmproxy_confdir_rejects_mismatched_key(tmp_path: Path) -> None:
    ca_pem, _ = certs.generate_ca("a", valid_days=1)
    _, other_key = certs.generate_ca("b", valid_days=1)
    with pytest.raises(ValueError, match="does not match"):
        certs.write_mitmproxy_confdir(ca_pem, other_key, tmp_path / "conf")
    assert not (tmp_path / "conf").exists()
