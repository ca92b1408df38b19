"""The resolver's answers in wire format, through dnspython (`matchlock.net.dns.answer` loads
this module on the first query; the rules are in that module's docstring)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import dns.exception
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from matchlock.net.dns import EDNS_PAYLOAD, MAX_QUERY, TTL, header_reply, valid_hostname
from matchlock.net.synthetic import SyntheticMap, normalize_name

if TYPE_CHECKING:
    from matchlock.net.dns import NamePolicy

log = logging.getLogger("matchlock.net.dns")


def respond(
    query: bytes, policy: NamePolicy, smap: SyntheticMap, local: Mapping[str, str]
) -> bytes:
    """The reply to a query that `dns.answer` has already checked for size and direction."""
    try:
        q = dns.message.from_wire(query)
    except Exception:  # dnspython raises many types for hostile input (also for TSIG-signed
        # queries: we hold no keys); all mean "malformed" to us
        return header_reply(query, dns.rcode.FORMERR)
    try:
        return _respond(q, policy, smap, local).to_wire(max_size=MAX_QUERY)
    except dns.exception.DNSException:
        return header_reply(query, dns.rcode.SERVFAIL)


def _respond(
    q: dns.message.Message, policy: NamePolicy, smap: SyntheticMap, local: Mapping[str, str]
) -> dns.message.Message:
    r = dns.message.make_response(q, recursion_available=True, our_payload=EDNS_PAYLOAD)
    if q.opcode() != dns.opcode.QUERY:
        r.set_rcode(dns.rcode.NOTIMP)
        return r
    if len(q.question) != 1 or q.answer or q.authority:
        r.set_rcode(dns.rcode.FORMERR)
        return r
    question = q.question[0]
    qtype, qclass = question.rdtype, question.rdclass
    if qclass != dns.rdataclass.IN or dns.rdatatype.is_metatype(qtype):
        r.set_rcode(dns.rcode.REFUSED)
        return r
    name = normalize_name(question.name.to_text(omit_final_dot=True))
    if not question.name.is_absolute() or not valid_hostname(name):
        r.set_rcode(dns.rcode.NXDOMAIN)
        return r
    address = local.get(name)
    if address is None and (name == "localhost" or name.endswith(".localhost")):
        address = "127.0.0.1"
    if address is None:
        if not policy.name_allowed(name):
            r.set_rcode(dns.rcode.NXDOMAIN)
            return r
        if qtype == dns.rdatatype.A:
            address = smap.address_for(name)
            if address is None:
                # Every address may still be in use: refuse rather than recycle one.
                log.warning("synthetic address map full; refusing %s", name)
                r.set_rcode(dns.rcode.SERVFAIL)
                return r
    # NOERROR; only A carries a record. Other types of an allowed name are "no data" rather
    # than REFUSED: musl ignores REFUSED and waits for its timeout, which would hang the guest.
    if qtype == dns.rdatatype.A:
        r.answer.append(
            dns.rrset.from_text(question.name, TTL, dns.rdataclass.IN, dns.rdatatype.A, address)
        )
    return r
