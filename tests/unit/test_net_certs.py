"""The per-sandbox CA: leaf contents, caching, and a real handshake in memory."""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from matchlock.net.certs import CertificateAuthority, bundle


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("unit", cache_size=4)


def handshake(ca: CertificateAuthority, server_ctx: ssl.SSLContext, sni: str) -> str | None:
    """Run a TLS handshake in memory; returns the negotiated ALPN protocol."""
    client_ctx = ssl.create_default_context(cadata=ca.ca_pem().decode())
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    return client.selected_alpn_protocol()


def test_ca_certificate(ca: CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.ca_pem())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_leaf_contents(ca: CertificateAuthority) -> None:
    pem = ca.leaf_pem("api.example.com")
    leaf = x509.load_pem_x509_certificate(pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now - dt.timedelta(hours=23)  # backdated for skew
    assert leaf.issuer == ca.cert.subject
    assert pem.endswith(ca.ca_pem())  # chain: leaf, CA


def test_one_leaf_key_for_all_names(ca: CertificateAuthority) -> None:
    a = x509.load_pem_x509_certificate(ca.leaf_pem("a.test")).public_key()
    b = x509.load_pem_x509_certificate(ca.leaf_pem("b.test")).public_key()
    assert a == b


def test_ip_leaf(ca: CertificateAuthority) -> None:
    leaf = x509.load_pem_x509_certificate(ca.leaf_pem("93.184.216.34"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["93.184.216.34"]


def test_real_handshake_and_alpn(ca: CertificateAuthority) -> None:
    assert handshake(ca, ca.context_for("api.example.com"), "api.example.com") == "h2"


def test_wrong_name_fails_verification(ca: CertificateAuthority) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, ca.context_for("a.example.com"), "b.example.com")


def test_other_ca_is_not_trusted(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, other.context_for("x.test"), "x.test")


def test_context_cache_is_bounded_lru(ca: CertificateAuthority) -> None:
    first = ca.context_for("n0.test")
    assert ca.context_for("n0.test") is first
    for i in range(1, 6):
        ca.context_for(f"n{i}.test")
    assert ca.context_for("n0.test") is not first  # evicted (cache_size=4)


def test_reload_from_pem(ca: CertificateAuthority) -> None:
    again = CertificateAuthority.from_pem(ca.ca_pem(), ca.key_pem())
    assert handshake(ca, again.context_for("r.test"), "r.test") == "h2"


def test_bundle() -> None:
    assert bundle(b"ROOTS", b"CA\n") == b"ROOTS\nCA\n"
    assert bundle(b"ROOTS\n", b"CA\n") == b"ROOTS\nCA\n"
    assert bundle(b"", b"CA\n") == b"CA\n"
