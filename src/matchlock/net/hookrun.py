"""Network hook rules at work in the proxy: the `before` phase on a request (after admission,
before secrets), the `after` phase on a response head, callbacks over the unix socket, and the
response body transforms. Shared by the HTTP/1.1 and HTTP/2 relays.

Failing closed: a callback that cannot be reached, errors, times out or answers something that
cannot be applied ends the request with a 502 (and an audit line); the reference lets it
through unchanged, which would turn any crash of a policy hook (one the guest can provoke with
an unusual request) into a bypass.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from matchlock.net import http1
from matchlock.net.hooks import (
    DEFAULT_CALLBACK_TIMEOUT_MS,
    MAX_BODY,
    HookConfig,
    HookError,
    Phase,
    RequestView,
    ResponsePlan,
    Rule,
    SseRewriter,
    apply_answer_to_request,
    apply_answer_to_response,
    apply_request_rule,
    apply_response_rule,
    callback_request,
    parse_answer,
    replace_all,
)
from matchlock.net.http1 import Framing, Response
from matchlock.net.masking import ValueMask
from matchlock.net.proxy import Blocked  # proxy imports this module lazily: no cycle
from matchlock.net.streams import IncompleteBody, Stream

MAX_ANSWER = (MAX_BODY // 3 + 1) * 4 + (1 << 20)  # a base64 body and the rest of the reply
# Kept from the guest's request whatever a hook does: the name and the framing are ours.
_KEEP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                   b"upgrade"}) | http1.HOP_BY_HOP
_RESPONSE_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection",
                               b"keep-alive", b"proxy-connection", b"te", b"trailer"})


class Hooks:
    """The compiled rules of one sandbox, applied per request."""

    def __init__(self, config: HookConfig) -> None:
        self.config = config
        self.before_rules = config.phase("before")
        self.after_rules = config.phase("after")

    # -- before -------------------------------------------------------------------------

    async def before(self, req: http1.Request, host: str) -> RequestView | Blocked:
        """Apply the `before` rules to `req` in place; the view is what the `after` phase and
        callbacks see (placeholders only: secrets are substituted later)."""
        view = RequestView(
            host=host, method=req.method.decode("latin-1"), target=req.target.decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers
                     if k.lower() not in _KEEP],
        )
        for rule in self.before_rules:
            if not rule.matches(host, view.method, view.path):
                continue
            if rule.action == "block":
                return _blocked(rule, "before")
            apply_request_rule(rule, view)
            view.rules.append(rule.label)
            if rule.callback_id:
                try:
                    answer = parse_answer(
                        await self._call(rule, callback_request(rule, "before", view)),
                        "before", rule.label)
                except HookError as e:
                    return Blocked(502, str(e), f"network hook {rule.label}")
                if answer.action == "block":
                    return _blocked(rule, "before", by_callback=True)
                apply_answer_to_request(answer, view)
        if view.changed:
            req.target = view.target.encode("latin-1")
            kept = [(k, v) for k, v in req.headers if k.lower() in _KEEP]
            req.headers = kept + [(k.encode("latin-1"), v.encode("latin-1"))
                                  for k, v in view.headers]
            # A header a hook set is end to end, even if the guest named it in Connection.
            req.connection_tokens -= {k.lower().encode("latin-1") for k, _ in view.headers}
        return view

    # -- after --------------------------------------------------------------------------

    def matching_after(self, view: RequestView) -> list[Rule]:
        return [r for r in self.after_rules if r.matches(view.host, view.method, view.path)]

    def prepare_after(self, view: RequestView, req: http1.Request) -> list[Rule]:
        """The `after` rules this request will meet. When they may rewrite the body, the
        request asks for no compression: a rule finds text, not gzip."""
        rules = self.matching_after(view)
        if any(r.body_replacements or r.callback_id for r in rules):
            req.headers = [h for h in req.headers if h[0].lower() != b"accept-encoding"]
        return rules

    async def after(self, view: RequestView, rules: list[Rule], resp: Response,
                    mask: ValueMask | None) -> ResponsePlan | Blocked:
        headers = [(k.decode("latin-1"), _masked(v, mask)) for k, v in resp.headers
                   if k.lower() not in _RESPONSE_FRAMING]
        plan = ResponsePlan(headers=headers)
        for rule in rules:
            if rule.action == "block":
                return _blocked(rule, "after")
            apply_response_rule(rule, plan)
            plan.rules.append(rule.label)
            if rule.callback_id:
                payload = callback_request(rule, "after", view, resp.status, plan.headers,
                                           plan.is_sse)
                try:
                    answer = parse_answer(await self._call(rule, payload), "after", rule.label)
                except HookError as e:
                    return Blocked(502, str(e), f"network hook {rule.label}")
                if answer.action == "block":
                    return _blocked(rule, "after", by_callback=True)
                apply_answer_to_response(answer, plan)
        encoded = encoded_body(resp, plan)
        if encoded is not None:
            return Blocked(502, encoded, f"network hook {plan.rules[-1]}")
        return plan

    # -- callbacks ------------------------------------------------------------------------

    async def _call(self, rule: Rule, payload: dict[str, Any]) -> Any:
        timeout = (rule.timeout_ms or DEFAULT_CALLBACK_TIMEOUT_MS) / 1000
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    self.config.callback_socket, limit=MAX_ANSWER)
                writer.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            return json.loads(line)
        except TimeoutError:
            raise HookError(f"network hook {rule.label}: the callback did not answer within "
                            f"{timeout * 1000:.0f} ms") from None
        except (OSError, ValueError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError) as e:
            raise HookError(f"network hook {rule.label}: the callback failed: "
                            f"{type(e).__name__}: {e}"[:300]) from None
        finally:
            if writer is not None:
                writer.close()


def _blocked(rule: Rule, phase: Phase, by_callback: bool = False) -> Blocked:
    how = "its callback" if by_callback else "the rule"
    return Blocked(403, f"blocked by network hook {rule.label} ({phase} phase, {how})",
                   f"network hook {rule.label}")


def _masked(value: bytes, mask: ValueMask | None) -> str:
    return (mask.all(value) if mask is not None else value).decode("latin-1")


def response_headers(plan: ResponsePlan, mask: ValueMask | None) -> list[tuple[bytes, bytes]]:
    """The plan's headers as bytes, masked again (a hook may have copied a header)."""
    out = []
    for k, v in plan.headers:
        raw = v.encode("latin-1")
        out.append((k.encode("latin-1"), mask.all(raw) if mask is not None else raw))
    return out


async def body_chunks(up: Stream, resp: Response) -> AsyncIterator[bytes]:
    """The response payload, decoded from its HTTP/1.1 framing, as it arrives."""
    if resp.framing is Framing.LENGTH:
        left = resp.content_length
        while left:
            data = await up.read_some()
            if not data:
                raise IncompleteBody("upstream closed before the end of the body")
            if len(data) > left:
                up.buf += data[left:]
                data = data[:left]
            left -= len(data)
            yield data
    elif resp.framing is Framing.CHUNKED:
        parser = http1.ChunkedReader(decode=True)
        while not parser.done:
            data = await up.read_some()
            if not data:
                raise IncompleteBody("upstream closed before the end of a chunked body")
            try:
                used = parser.feed(data)
            except http1.HttpError as exc:
                raise http1.HttpError(502, f"bad chunked body from upstream: {exc.message}"
                                      ) from None
            if used < len(data):
                up.buf += data[used:]
            for piece in parser.payload:
                yield piece
            parser.payload.clear()
    elif resp.framing is Framing.UNTIL_CLOSE:
        while True:
            data = await up.read_some()
            if not data:
                return
            yield data


class BodyTooLarge(Exception):
    pass


def encoded_body(resp: Response, plan: ResponsePlan) -> str | None:
    """Why replacements cannot be applied to this body (it is compressed), or None. A
    redaction rule must not be skipped because the origin compressed: the caller fails
    closed (502)."""
    if not plan.replacements or plan.set_body is not None or resp.framing is Framing.NONE:
        return None
    coding = (resp.header(b"content-encoding") or b"").strip().lower()
    if coding in (b"", b"identity"):
        return None
    return (f"a network hook rewrites the response body, but the origin sent it encoded "
            f"(Content-Encoding: {coding.decode('latin-1')[:40]})")


def _mask_all(mask: ValueMask | None, data: bytes) -> bytes:
    return mask.all(data) if mask is not None else data


async def whole_body(up: Stream, resp: Response, plan: ResponsePlan,
                     mask: ValueMask | None) -> bytes:
    """The new body of a buffered plan (set_body, or replacements on a non-SSE body), masked.

    Values are masked before the replacements too: an innocent rule (`-` → `_`) must not turn
    an echoed value into a form the mask no longer recognises."""
    if plan.set_body is not None:
        return _mask_all(mask, replace_all(plan.set_body, plan.replacements))
    if resp.framing is Framing.LENGTH and resp.content_length > MAX_BODY:
        raise BodyTooLarge(resp.content_length)
    parts, size = [], 0
    async for data in body_chunks(up, resp):
        size += len(data)
        if size > MAX_BODY:
            raise BodyTooLarge(size)
        parts.append(data)
    raw = _mask_all(mask, b"".join(parts))
    return _mask_all(mask, replace_all(raw, plan.replacements))


async def streamed_body(up: Stream, resp: Response, plan: ResponsePlan,
                        pre: ValueMask | None) -> AsyncIterator[bytes]:
    """The body of a streamed plan: event-stream `data:` lines rewritten as they come, after
    `pre` masked the values in the origin's form (the caller masks the result again)."""
    rewriter = SseRewriter(plan.replacements)
    async for data in body_chunks(up, resp):
        out = rewriter.feed(pre.feed(data) if pre is not None else data)
        if out:
            yield out
    tail = rewriter.feed(pre.flush()) if pre is not None else b""
    tail += rewriter.finish()
    if tail:
        yield tail


def hook_reason(reason: str, view: RequestView | None, plan: ResponsePlan | None = None) -> str:
    """The audit reason, naming the hook rules that acted on the exchange."""
    names = (view.rules if view is not None else []) + (plan.rules if plan is not None else [])
    return f"{reason}; hooks: {', '.join(dict.fromkeys(names))}" if names else reason
