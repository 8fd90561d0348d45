"""Certificate authority helpers for the podtally sidecar.

Each namespace gets its own CA. The sidecar's mitmproxy mints leaf certificates
from that CA on the fly; workloads trust the CA through a mounted bundle.

Everything here is a pure function over PEM bytes, except
:func:`write_mitmproxy_confdir`, which lays the CA out the way mitmproxy 11
loads it from its ``confdir``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KeyType",
    "MITMPROXY_BASENAME",
    "cert_not_after",
    "generate_ca",
    "issue_server_cert",
    "load_certificate",
    "needs_rotation",
    "write_mitmproxy_confdir",
]

KeyType: TypeAlias = Literal["ec", "rsa"]
IPLike: TypeAlias = str | ipaddress.IPv4Address | ipaddress.IPv6Address
_PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: mitmproxy's ``CertStore.from_store(confdir, "mitmproxy", ...)`` basename.
MITMPROXY_BASENAME = "mitmproxy"

_RSA_KEY_SIZE = 2048
# Backdate notBefore a little so that clocks that lag behind still accept a fresh cert.
_CLOCK_SKEW = dt.timedelta(hours=1)

# mitmproxy's CertStore reads ``<basename>-dhparam.pem`` and, when it is missing, tries to
# *write* its built-in default into the confdir, which fails on a read-only mount. We
# write the same parameters ourselves: a byte-for-byte copy of mitmproxy 11's DEFAULT_DHPARAM
# (4096-bit). Only used for (rare) finite-field DHE cipher suites.
_DHPARAM_PEM = b"""-----BEGIN DH PARAMETERS-----
MIICCAKCAgEAyT6LzpwVFS3gryIo29J5icvgxCnCebcdSe/NHMkD8dKJf8suFCg3
O2+dguLakSVif/t6dhImxInJk230HmfC8q93hdcg/j8rLGJYDKu3ik6H//BAHKIv
j5O9yjU3rXCfmVJQic2Nne39sg3CreAepEts2TvYHhVv3TEAzEqCtOuTjgDv0ntJ
Gwpj+BJBRQGG9NvprX1YGJ7WOFBP/hWU7d6tgvE6Xa7T/u9QIKpYHMIkcN/l3ZFB
chZEqVlyrcngtSXCROTPcDOQ6Q8QzhaBJS+Z6rcsd7X+haiQqvoFcmaJ08Ks6LQC
ZIL2EtYJw8V8z7C0igVEBIADZBI6OTbuuhDwRw//zU1uq52Oc48CIZlGxTYG/Evq
o9EWAXUYVzWkDSTeBH1r4z/qLPE2cnhtMxbFxuvK53jGB0emy2y1Ei6IhKshJ5qX
IB/aE7SSHyQ3MDHHkCmQJCsOd4Mo26YX61NZ+n501XjqpCBQ2+DfZCBh8Va2wDyv
A2Ryg9SUz8j0AXViRNMJgJrr446yro/FuJZwnQcO3WQnXeqSBnURqKjmqkeFP+d8
6mk2tqJaY507lRNqtGlLnj7f5RNoBFJDCLBNurVgfvq9TCVWKDIFD4vZRjCrnl6I
rD693XKIHUCWOjMh1if6omGXKHH40QuME2gNa50+YPn1iYDl88uDbbMCAQI=
-----END DH PARAMETERS-----
"""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _require_aware(when: dt.datetime, name: str) -> dt.datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return when.astimezone(dt.UTC)


def _generate_key(key_type: KeyType) -> _PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_KEY_SIZE)
    raise ValueError(f"unsupported key type {key_type!r} (want 'ec' or 'rsa')")


def _key_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_private_key(pem: bytes) -> _PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported CA key type {type(key).__name__} (want EC or RSA)")
    return key


def _signature_hash(key: _PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial_number() -> int:
    # Positive, at most 20 octets (RFC 5280 4.1.2.2), with >= 64 bits of entropy.
    return secrets.randbits(159) | 1


def load_certificate(pem: bytes) -> x509.Certificate:
    """Load the first ``CERTIFICATE`` block of ``pem``; other PEM blocks (a key) are skipped."""
    return x509.load_pem_x509_certificate(pem)


def generate_ca(
    common_name: str,
    *,
    valid_days: int = 3650,
    key_type: KeyType = "ec",
    organization: str | None = "podtally",
    now: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Create a self-signed CA that may sign only end-entity certs.

    Returns ``(cert_pem, key_pem)``; the key is unencrypted PKCS#8 PEM.
    """
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    start = _utcnow() if now is None else _require_aware(now, "now")
    key = _generate_key(key_type)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attrs)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _signature_hash(key))
    )
    return _cert_pem(cert), _key_pem(key)


def _san_entries(
    dns_names: Iterable[str], ip_addresses: Iterable[IPLike]
) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    for ip in ip_addresses:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        entries.append(x509.IPAddress(addr))
    return entries


def issue_server_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    dns_names: Sequence[str],
    ip_addresses: Sequence[IPLike] = (),
    *,
    valid_days: int = 90,
    key_type: KeyType = "ec",
    now: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a TLS server (leaf) cert for ``dns_names`` and ``ip_addresses``.

    Returns ``(cert_pem, key_pem)`` (leaf only, no chain). The subject CN is the first name;
    notAfter is clamped to the CA's own notAfter.
    """
    if not dns_names and not ip_addresses:
        raise ValueError("a server cert needs at least one DNS name or IP address")
    if valid_days <= 0:
        raise ValueError("valid_days must be positive")
    start = _utcnow() if now is None else _require_aware(now, "now")
    ca_cert = load_certificate(ca_cert_pem)
    ca_key = _load_private_key(ca_key_pem)
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("CA key does not match CA certificate")

    key = _generate_key(key_type)
    cn = dns_names[0] if dns_names else str(ip_addresses[0])
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    not_after = min(start + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    not_before = max(start - _CLOCK_SKEW, ca_cert.not_valid_before_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(_san_entries(dns_names, ip_addresses)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, _signature_hash(ca_key))
    )
    return _cert_pem(cert), _key_pem(key)


def cert_not_after(pem: bytes) -> dt.datetime:
    """notAfter of the first certificate in ``pem``, as an aware UTC datetime."""
    return load_certificate(pem).not_valid_after_utc


def needs_rotation(pem: bytes, now: dt.datetime, min_remaining: dt.timedelta) -> bool:
    """True when the cert expires in less than ``min_remaining`` from ``now`` (or already has)."""
    now_utc = _require_aware(now, "now")
    return cert_not_after(pem) - now_utc < min_remaining


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file + rename, created with ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; widen only where asked
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_mitmproxy_confdir(ca_cert_pem: bytes, ca_key_pem: bytes, confdir: Path) -> None:
    """Lay out ``confdir`` so mitmproxy 11 loads this CA instead of generating its own.

    mitmproxy's ``CertStore.from_store(confdir, "mitmproxy", ...)`` only generates a CA when
    ``mitmproxy-ca.pem`` is missing; it reads the key and the CA cert from that one file
    (key first, then cert). ``mitmproxy-dhparam.pem`` is written too so that mitmproxy never
    has to write into ``confdir``. ``mitmproxy-ca-cert.pem``/``.cer``/``.p12`` hold the public
    cert only (what clients should trust; mitmproxy's onboarding app serves them). The
    key+cert PKCS#12 ``mitmproxy-ca.p12`` that mitmproxy writes for Windows is deliberately
    not written: nothing loads it and it would be one more copy of the key.
    ``mitmproxy-ca.pem`` (the only file holding the key) is mode 0600; files are replaced
    atomically, so a concurrently starting mitmproxy never reads a half-written file.
    """
    cert = load_certificate(ca_cert_pem)
    key = _load_private_key(ca_key_pem)
    if cert.public_key() != key.public_key():
        raise ValueError("CA key does not match CA certificate")
    cert_pem = _cert_pem(cert)
    key_pem = _key_pem(key)

    confdir = Path(confdir)
    confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    base = MITMPROXY_BASENAME
    _atomic_write(confdir / f"{base}-dhparam.pem", _DHPARAM_PEM, 0o644)
    _atomic_write(confdir / f"{base}-ca-cert.pem", cert_pem, 0o644)
    _atomic_write(confdir / f"{base}-ca-cert.cer", cert_pem, 0o644)
    _atomic_write(
        confdir / f"{base}-ca-cert.p12",
        pkcs12.serialize_key_and_certificates(
            name=base.encode(),
            key=None,
            cert=cert,
            cas=None,
            encryption_algorithm=serialization.NoEncryption(),
        ),
        0o644,
    )
    # Last: its presence is what stops mitmproxy from generating a CA of its own.
    _atomic_write(confdir / f"{base}-ca.pem", key_pem + cert_pem, 0o600)
