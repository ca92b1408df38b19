"""The resolver's answers, without sockets."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsigkeyring

from matchlock.net.dns import MAX_QUERY, TokenBucket, answer, valid_hostname
from matchlock.net.synthetic import SyntheticMap
from tests.net.netenv import AllowList

POLICY = AllowList("allowed.test", "*.npm.test")


def ask(wire: bytes, smap: SyntheticMap | None = None,
        local: dict[str, str] | None = None) -> dns.message.Message:
    out = answer(wire, POLICY, smap if smap is not None else SyntheticMap(), local=local)
    assert out is not None
    return dns.message.from_wire(out)


def q(name: str, rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def test_allowed_a_gets_a_synthetic_address_with_a_short_ttl() -> None:
    smap = SyntheticMap()
    r = ask(q("Allowed.TEST"), smap)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and not r.flags & dns.flags.AA
    (rrset,) = r.answer
    assert rrset.ttl == 5 and rrset.rdtype == dns.rdatatype.A
    # The owner name echoes the question's case (0x20 randomisation must keep working).
    assert rrset.name.to_text() == "Allowed.TEST."
    assert str(next(iter(rrset))) == smap.address_for("allowed.test")


def test_allowed_aaaa_and_other_types_are_no_data() -> None:
    for rdtype in ("AAAA", "TXT", "MX", "HTTPS", "SRV", "PTR"):
        r = ask(q("x.npm.test", rdtype))
        assert r.rcode() == dns.rcode.NOERROR and r.answer == [], rdtype


def test_denied_names_are_nxdomain_and_take_no_address() -> None:
    smap = SyntheticMap()
    for name, rdtype in [("denied.test", "A"), ("npm.test", "A"), ("denied.test", "AAAA"),
                         ("allowed.test.evil.test", "A"), ("4.3.2.1.in-addr.arpa", "PTR")]:
        assert ask(q(name, rdtype), smap).rcode() == dns.rcode.NXDOMAIN, name
    assert len(smap) == 0


def test_names_that_are_not_host_names_are_nxdomain() -> None:
    for name in ("has space.npm.test", "bin\\000ary.npm.test", "-dash.npm.test", "a.*.npm.test"):
        assert ask(q(name)).rcode() == dns.rcode.NXDOMAIN, name


def test_long_names_under_an_allowed_glob_are_answered_locally() -> None:
    # Data in the labels goes nowhere: the answer is made here, nothing is looked up.
    name = ".".join(["a" * 60] * 4) + ".npm.test"
    (rrset,) = ask(q(name)).answer
    assert str(next(iter(rrset))).startswith("198.18.")


def test_meta_types_other_classes_and_opcodes_are_refused() -> None:
    assert ask(q("allowed.test", "ANY")).rcode() == dns.rcode.REFUSED
    assert ask(q("allowed.test", "AXFR")).rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    assert ask(chaos.to_wire()).rcode() == dns.rcode.REFUSED
    notify = dns.message.make_query("allowed.test", "A")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert ask(notify.to_wire()).rcode() == dns.rcode.NOTIMP


def test_several_questions_are_formerr() -> None:
    m = dns.message.make_query("allowed.test", "A")
    m.find_rrset(m.question, dns.name.from_text("x.npm.test"), dns.rdataclass.IN,
                 dns.rdatatype.A, create=True)
    assert ask(m.to_wire()).rcode() == dns.rcode.FORMERR


def test_malformed_signed_runts_and_responses() -> None:
    garbage = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\xff" * 20
    r = answer(garbage, POLICY, SyntheticMap())
    assert r is not None
    assert struct.unpack("!HH", r[:4]) == (0x1234, 0x8000 | 0x0100 | 0x0080 | 1)
    assert answer(b"\x00" * 11, POLICY, SyntheticMap()) is None
    assert answer(q("allowed.test") + b"\0" * MAX_QUERY, POLICY, SyntheticMap()) is None
    response = dns.message.make_response(dns.message.make_query("allowed.test", "A"))
    assert answer(response.to_wire(), POLICY, SyntheticMap()) is None
    signed = dns.message.make_query("allowed.test", "A")
    signed.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), "k.")
    assert ask(signed.to_wire()).rcode() == dns.rcode.FORMERR


def test_edns_is_answered_with_edns() -> None:
    r = ask(q("allowed.test", use_edns=0, payload=4096))
    assert r.edns == 0 and r.payload == 1232


def test_localhost_and_local_names() -> None:
    for name in ("localhost", "foo.localhost"):
        (rrset,) = ask(q(name)).answer
        assert str(next(iter(rrset))) == "127.0.0.1"
    assert ask(q("localhost", "AAAA")).answer == []
    (rrset,) = ask(q("sbx"), local={"sbx": "10.213.0.2"}).answer
    assert str(next(iter(rrset))) == "10.213.0.2"


def test_full_map_is_servfail_not_a_recycled_address() -> None:
    smap = SyntheticMap(capacity=1)
    assert ask(q("allowed.test"), smap).rcode() == dns.rcode.NOERROR
    assert ask(q("x.npm.test"), smap).rcode() == dns.rcode.SERVFAIL


def test_valid_hostname() -> None:
    assert valid_hostname("a.b-c.d_e.123")
    assert not valid_hostname("")
    assert not valid_hostname("a..b")
    assert not valid_hostname("a-.b")
    assert not valid_hostname("x" * 64)
    assert not valid_hostname(".".join(["x" * 60] * 5))


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1
    assert [b.take() for _ in range(3)] == [True, True, False]


def test_with_the_real_policy_and_runtime_changes() -> None:
    from matchlock.net.policy import Policy

    policy = Policy(["allowed.test", "*.npm.test", "github.test:22"])
    smap = SyntheticMap()

    def rcode(name: str) -> int:
        out = answer(q(name), policy, smap)
        assert out is not None
        return dns.message.from_wire(out).rcode()

    assert rcode("github.test") == dns.rcode.NOERROR  # allowed on some port is enough
    assert rcode("late.test") == dns.rcode.NXDOMAIN
    policy.add(["late.test"])
    assert rcode("late.test") == dns.rcode.NOERROR
    policy.remove(["allowed.test"])
    assert rcode("allowed.test") == dns.rcode.NXDOMAIN
