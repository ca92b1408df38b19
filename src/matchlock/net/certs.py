"""The sandbox's interception CA and the leaf certificates it mints.

- One CA per sandbox (a leaked key opens nothing else), EC P-256: generating the key and
  signing a leaf take well under a millisecond, where RSA-2048 key generation takes tens of
  milliseconds (docs/performance.md).
- ONE leaf key for every leaf (the reference generated an RSA key per host into an unbounded
  cache); leaf certificates are cached per name in a bounded LRU together with a ready
  `ssl.SSLContext`, so a repeat connection costs a dictionary lookup.
- Leaves are backdated by a day: guest clocks may lag the host's.
- Python's ssl module loads certificates and keys only from paths; we hand it memfd paths
  (/proc/self/fd/N), so no key material ever touches a disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BACKDATE = dt.timedelta(days=1)
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_LIFETIME = dt.timedelta(days=90)
LEAF_REFRESH = dt.timedelta(days=30)  # re-mint cached leaves older than this
DEFAULT_ALPN = ("h2", "http/1.1")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """A per-sandbox CA, the shared leaf key and the per-name leaf cache."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        *,
        cache_size: int = 1024,
        alpn: Sequence[str] = DEFAULT_ALPN,
    ) -> None:
        self.cert = cert
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._alpn = list(alpn)
        self._cache: OrderedDict[str, tuple[dt.datetime, ssl.SSLContext]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def generate(
        cls, label: str = "", *, cache_size: int = 1024, alpn: Sequence[str] = DEFAULT_ALPN
    ) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "matchlock"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"matchlock sandbox CA {label}".strip()[:64]
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, cache_size=cache_size, alpn=alpn)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """Reload a CA saved with `key_pem()` (for sandboxes that outlive their owner)."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key is not an EC key")
        return cls(x509.load_pem_x509_certificate(cert_pem), key)

    def ca_pem(self) -> bytes:
        """The CA certificate, for the guest's trust store."""
        return self._ca_pem

    def key_pem(self) -> bytes:
        """The CA private key (PKCS#8 PEM). Only for persisting a sandbox's own CA."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def leaf_pem(self, name: str) -> bytes:
        """A fresh leaf certificate for `name` (a DNS name or an IP literal)."""
        now = _now()
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem

    def context_for(self, name: str) -> ssl.SSLContext:
        """A server-side SSLContext presenting a leaf for `name`, cached (LRU) per name."""
        now = _now()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and now - hit[0] < LEAF_REFRESH:
                self._cache.move_to_end(name)
                return hit[1]
        ctx = self._build_context(self.leaf_pem(name))
        with self._lock:
            self._cache[name] = (now, ctx)
            self._cache.move_to_end(name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ctx

    def _build_context(self, chain_pem: bytes) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Small TLS 1.2 clients (BusyBox wget, the default image's) send no
        # signature_algorithms, which means "SHA-1 only"; OpenSSL refuses SHA-1 signatures
        # above security level 0 and then finds no shared cipher. This side of the proxy only
        # ever talks to the sandbox's own guest over its TAP, and the guest picks its own
        # client: still forward-secret AEAD/CBC suites only, TLS 1.2+. (Upstream TLS keeps the
        # system's defaults.)
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:@SECLEVEL=0")
        ctx.set_alpn_protocols(self._alpn)
        with _memfile(chain_pem) as cert_path, _memfile(self._leaf_key_pem) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
        return ctx


class _memfile:
    """A path to an in-memory file (memfd) holding `data`, valid inside the `with`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._fd = -1

    def __enter__(self) -> str:
        self._fd = os.memfd_create("matchlock-tls", os.MFD_CLOEXEC)
        os.write(self._fd, self._data)
        return f"/proc/self/fd/{self._fd}"

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def bundle(image_roots_pem: bytes, ca_pem: bytes) -> bytes:
    """The guest's CA bundle: the image's roots followed by the sandbox CA."""
    roots = image_roots_pem
    if roots and not roots.endswith(b"\n"):
        roots += b"\n"
    return roots + ca_pem
