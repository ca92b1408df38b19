"""Network hook rules (docs/network.md, "Hook rules"): compiled, matched and applied, pure.

A rule matches a request by host glob, method and path glob, in one phase: `before` (the
request, before it is sent and before secrets are substituted: a hook only ever sees
placeholders) or `after` (the response head, before it reaches the guest). It then blocks,
mutates, or asks an SDK-local callback (`hook_callback`).

Mutations are refused when they could do what the guest may not: a hook never changes the
host a request goes to (no `Host`, no absolute path), never touches the framing of either
message (Content-Length, Transfer-Encoding and the hop-by-hop headers are ours) and never
writes a byte that would split a message (CR, LF, NUL). The allow-list and the secret scoping
are applied to the mutated request, so a mutation cannot carry a placeholder anywhere the guest
itself could not.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

from matchlock.net.policy import HostGlob

Phase = Literal["before", "after"]
Action = Literal["allow", "block", "mutate"]

MAX_RULES = 256
MAX_BODY = 8 << 20  # a body a rule must see whole is buffered up to this, else 502
MAX_SSE_LINE = 1 << 20  # an SSE line being rewritten is held until its end, up to this
DEFAULT_CALLBACK_TIMEOUT_MS = 30_000

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
# Never set or deleted by a hook: the name the request goes to, and the message's framing.
_REQUEST_RESERVED = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization",
})
_RESPONSE_RESERVED = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection",
    "te", "trailer", "upgrade", "proxy-authenticate",
})
# Kept by the proxy when a callback replaces all response headers (it frames the body).
_RESPONSE_FRAMING = _RESPONSE_RESERVED


class HookError(ValueError):
    """A rule or a callback answer that cannot be applied safely; the message says why."""


def canonical(name: str) -> str:
    """Go's CanonicalHeaderKey: `x-api-key` → `X-Api-Key`."""
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def check_header(name: str, value: str | None, reserved: frozenset[str], where: str) -> str:
    if not _TOKEN.match(name):
        raise HookError(f"{where}: invalid header name {name!r}")
    if name.lower() in reserved:
        raise HookError(f"{where}: header {canonical(name)} cannot be changed by a hook "
                        "(the proxy owns the host and the message framing)")
    if value is not None and not _VALUE.match(value):
        raise HookError(f"{where}: the value of header {canonical(name)} contains CR, LF, NUL "
                        "or another control character")
    return canonical(name)


def check_path(path: str, where: str) -> str:
    """A rewritten path: absolute, encoded as a request target (decoded text, as Go's
    URL.Path; `%` becomes `%25`)."""
    if not path.startswith("/") or path.startswith("//"):
        raise HookError(f"{where}: rewrite path {path!r} must start with a single '/'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise HookError(f"{where}: rewrite path contains a control character")
    return quote(path, safe="/:@!$&'()*+,;=-._~")


class PathGlob:
    """Go's path.Match: `*` and `?` stop at `/`, `[…]` classes, `\\` escapes."""

    __slots__ = ("_regex", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        out, i = [], 0
        while i < len(text):
            c = text[i]
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "\\":
                i += 1
                if i == len(text):
                    raise HookError(f"path pattern {text!r}: trailing backslash")
                out.append(re.escape(text[i]))
            elif c == "[":
                end = text.find("]", i + 2)
                if end < 0:
                    raise HookError(f"path pattern {text!r}: unclosed '['")
                body = text[i + 1:end]
                neg = body.startswith("^")
                body = body[1:] if neg else body
                if not body or "/" in body:
                    raise HookError(f"path pattern {text!r}: invalid character class")
                esc = "".join("\\" + ch if ch in "\\]^[" else ch for ch in body)
                out.append(f"[^/{esc}]" if neg else f"[{esc}]")
                i = end
            else:
                out.append(re.escape(c))
            i += 1
        self._regex = re.compile("".join(out) + r"\Z", re.DOTALL)

    def matches(self, path: str) -> bool:
        return self._regex.match(path) is not None


@dataclass(frozen=True, slots=True)
class Replacement:
    find: bytes
    replace: bytes


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    phase: Phase
    action: Action
    hosts: tuple[HostGlob, ...] = ()
    methods: frozenset[str] = frozenset()
    path: PathGlob | None = None
    callback_id: str = ""
    timeout_ms: int = 0
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: tuple[str, ...] = ()
    set_query: tuple[tuple[str, str], ...] = ()
    delete_query: tuple[str, ...] = ()
    rewrite_path: str = ""  # encoded
    set_response_headers: tuple[tuple[str, str], ...] = ()
    delete_response_headers: tuple[str, ...] = ()
    body_replacements: tuple[Replacement, ...] = ()

    @property
    def label(self) -> str:
        return self.name or "(unnamed)"

    def matches(self, host: str, method: str, path: str) -> bool:
        if self.hosts and not any(g.matches(host) for g in self.hosts):
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        if self.path is None:
            return True
        glob = self.path
        return any(glob.matches(form) for form in path_forms(path))


def path_forms(path: str) -> tuple[str, ...]:
    """The decoded path, and the path an origin that normalises would serve (`//` collapsed,
    `.` and `..` resolved): a rule matches either, so `/admin//x` or `/v1/../admin/x` do not
    slip past a rule written for `/admin/*`."""
    path = path or "/"
    segments: list[str] = []
    for seg in re.sub("/+", "/", path).split("/")[1:]:
        if seg == "..":
            if segments:
                segments.pop()
        elif seg not in (".", ""):
            segments.append(seg)
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    normal = "/" + "/".join(segments) + ("/" if trailing and segments else "")
    return (path,) if normal == path else (path, normal)


# -- compilation (what `create` sends) ------------------------------------------------------


def _get_str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str) or "\0" in v:
        raise HookError(f"{where}.{key} must be a string")
    return v


def _get_list(d: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise HookError(f"{where}.{key} must be a list of strings")
    return v


def _get_map(d: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise HookError(f"{where}.{key} must be an object of strings")
    return v


def wire_value(text: str) -> str:
    """A value from JSON as the bytes it becomes on the wire (UTF-8), held as latin-1 text,
    the way header values read from the guest are held."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def json_value(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "replace")


def _headers(raw: Mapping[str, str], reserved: frozenset[str], where: str
             ) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for k, v in raw.items():
        if k.strip():
            v = wire_value(v)
            out[check_header(k.strip(), v, reserved, where)] = v
    return tuple(out.items())


def _names(raw: Iterable[str], reserved: frozenset[str], where: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(check_header(k.strip(), None, reserved, where)
                               for k in raw if k.strip()))


def _query_value(text: str, where: str) -> str:
    if "\0" in text:
        raise HookError(f"{where}: NUL in a query parameter")
    return text


def compile_rule(d: Any, index: int) -> Rule | None:
    """One wire rule → Rule, or None if it can do nothing (the reference drops those too)."""
    where = f"network.interception.rules[{index}]"
    if not isinstance(d, dict):
        raise HookError(f"{where} must be an object")
    name = _get_str(d, "name", where)
    if name:
        where = f"{where} ({name!r})"
    phase = (_get_str(d, "phase", where).strip().lower() or "before")
    if phase not in ("before", "after"):
        raise HookError(f"{where}: phase {phase!r} must be 'before' or 'after'")
    action = _get_str(d, "action", where).strip().lower() or "allow"
    if action not in ("allow", "block", "mutate"):
        # The reference treats an unknown action as allow: a typo would silently let through
        # what was meant to be blocked.
        raise HookError(f"{where}: action {action!r} must be 'allow', 'block' or 'mutate'")
    try:
        hosts = tuple(HostGlob(h) for h in _get_list(d, "hosts", where) if h.strip())
    except ValueError as e:
        raise HookError(f"{where}: hosts: {e}") from None
    methods = frozenset(m.strip().upper() for m in _get_list(d, "methods", where) if m.strip())
    path_text = _get_str(d, "path", where)
    path = PathGlob(path_text) if path_text else None
    timeout = d.get("timeout_ms")
    if timeout is not None and (type(timeout) is not int or not 0 <= timeout <= 3_600_000):
        raise HookError(f"{where}.timeout_ms must be an integer in 0..3600000")
    callback = _get_str(d, "callback_id", where).strip()
    rewrite = _get_str(d, "rewrite_path", where).strip()
    replacements = []
    raw_repl = d.get("body_replacements")
    if raw_repl is not None:
        if not isinstance(raw_repl, list):
            raise HookError(f"{where}.body_replacements must be a list")
        for r in raw_repl:
            if not isinstance(r, dict):
                raise HookError(f"{where}.body_replacements[] must be objects")
            find = _get_str(r, "find", where + ".body_replacements[]")
            if find:
                replace = _get_str(r, "replace", where + ".body_replacements[]")
                replacements.append(Replacement(find.encode(), replace.encode()))
    rule = Rule(
        name=name, phase=phase, action=action, hosts=hosts,  # type: ignore[arg-type]
        methods=methods, path=path, callback_id=callback, timeout_ms=timeout or 0,
        set_headers=_headers(_get_map(d, "set_headers", where), _REQUEST_RESERVED, where),
        delete_headers=_names(_get_list(d, "delete_headers", where), _REQUEST_RESERVED, where),
        set_query=tuple((k, _query_value(v, where))
                        for k, v in _get_map(d, "set_query", where).items() if k),
        delete_query=tuple(k for k in _get_list(d, "delete_query", where) if k),
        rewrite_path=check_path(rewrite, where) if rewrite else "",
        set_response_headers=_headers(_get_map(d, "set_response_headers", where),
                                      _RESPONSE_RESERVED, where),
        delete_response_headers=_names(_get_list(d, "delete_response_headers", where),
                                       _RESPONSE_RESERVED, where),
        body_replacements=tuple(replacements),
    )
    mutates = has_mutations(rule)
    if rule.action == "allow" and mutates:
        rule = _with_action(rule, "mutate")
    if rule.action != "block" and not mutates and not rule.callback_id:
        return None
    return rule


def _with_action(rule: Rule, action: Action) -> Rule:
    return replace(rule, action=action)


def has_mutations(rule: Rule) -> bool:
    if rule.phase == "before":
        return bool(rule.set_headers or rule.delete_headers or rule.set_query
                    or rule.delete_query or rule.rewrite_path)
    return bool(rule.set_response_headers or rule.delete_response_headers
                or rule.body_replacements)


@dataclass(frozen=True, slots=True)
class HookConfig:
    """What `create` asked for, compiled."""

    rules: tuple[Rule, ...] = ()
    callback_socket: str = ""

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def phase(self, phase: Phase) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.phase == phase)


def compile_rules(rules: Any, callback_socket: str = "") -> HookConfig:
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise HookError("network.interception.rules must be a list")
    if len(rules) > MAX_RULES:
        raise HookError(f"network.interception.rules: at most {MAX_RULES} rules")
    out = [r for i, raw in enumerate(rules) if (r := compile_rule(raw, i)) is not None]
    for r in out:
        if r.callback_id and not callback_socket:
            # The reference skips such a callback: a policy the caller relies on would be
            # silently off.
            raise HookError(f"network.interception rule {r.label!r} has callback_id "
                            f"{r.callback_id!r} but no network.interception.callback_socket")
    if callback_socket and not callback_socket.startswith("/"):
        raise HookError("network.interception.callback_socket must be an absolute path")
    return HookConfig(tuple(out), callback_socket)


# -- the request as hooks see it ----------------------------------------------------------


@dataclass(slots=True)
class RequestView:
    """One request, before secrets are substituted. `target` is the origin-form target as it
    will be sent (encoded); `headers` are the end-to-end headers (not Host, not framing)."""

    host: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    changed: bool = False  # target or headers differ from the guest's
    rules: list[str] = field(default_factory=list)  # names of rules that acted

    @property
    def raw_path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def path(self) -> str:
        """Decoded, as Go's URL.Path: what path globs match and callbacks see."""
        return unquote(self.raw_path) or "/"

    @property
    def query(self) -> list[tuple[str, str]]:
        _, sep, q = self.target.partition("?")
        return parse_qsl(q, keep_blank_values=True) if sep else []

    def set_query(self, pairs: Iterable[tuple[str, str]]) -> None:
        encoded = urlencode(sorted(pairs, key=lambda kv: kv[0]))
        self.target = self.raw_path + ("?" + encoded if encoded else "")
        self.changed = True


def _set_header(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    low = name.lower()
    return [h for h in headers if h[0].lower() != low] + [(name, value)]


def _del_headers(headers: list[tuple[str, str]], names: Iterable[str]) -> list[tuple[str, str]]:
    low = {n.lower() for n in names}
    return [h for h in headers if h[0].lower() not in low]


def _edit_headers(headers: list[tuple[str, str]], sets: Iterable[tuple[str, str]],
                  deletes: Iterable[str]) -> list[tuple[str, str]]:
    """Sets first, then deletes (the reference's order)."""
    for name, value in sets:
        headers = _set_header(headers, name, value)
    return _del_headers(headers, deletes)


def apply_request_rule(rule: Rule, view: RequestView) -> None:
    """A `before` rule's static mutations, in the reference's order."""
    headers = _edit_headers(view.headers, rule.set_headers, rule.delete_headers)
    if headers != view.headers:
        view.headers, view.changed = headers, True
    if rule.set_query or rule.delete_query:
        query = _grouped(view.query)
        for k, v in rule.set_query:
            query[k] = [v]
        for k in rule.delete_query:
            query.pop(k, None)
        view.set_query((k, v) for k, vs in query.items() for v in vs)
    if rule.rewrite_path:
        _, sep, q = view.target.partition("?")
        view.target = rule.rewrite_path + (sep + q if sep else "")
        view.changed = True


def _grouped(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Query pairs by key, in first-seen order."""
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


# -- callbacks: the exact JSON both ways (reference §3.5) ------------------------------------


def callback_request(rule: Rule, phase: Phase, view: RequestView, status: int = 0,
                     response_headers: list[tuple[str, str]] | None = None,
                     is_sse: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"callback_id": rule.callback_id, "phase": phase}
    if view.host:
        out["host"] = view.host
    if view.method:
        out["method"] = view.method
    out["path"] = view.path
    query = {k: vs[0] for k, vs in _grouped(view.query).items()}
    if query:
        out["query"] = query
    if view.headers:
        out["request_headers"] = multi_map(view.headers)
    if phase == "after":
        if status:
            out["status_code"] = status
        if response_headers:
            out["response_headers"] = multi_map(response_headers)
        if is_sse:
            out["is_sse"] = True
    return out


def multi_map(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in headers:
        out.setdefault(canonical(k), []).append(json_value(v))
    return out


@dataclass(slots=True)
class CallbackAnswer:
    action: Action = "allow"
    headers: list[tuple[str, str]] | None = None  # request (before) or response (after)
    query: list[tuple[str, str]] | None = None
    path: str = ""  # encoded
    body_replacements: tuple[Replacement, ...] = ()
    set_body: bytes | None = None


def _multi(raw: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(raw, dict):
        raise HookError(f"{where} must be an object")
    out = []
    for k, vs in raw.items():
        values = vs if isinstance(vs, list) else [vs]
        if not all(isinstance(v, str) for v in values):
            raise HookError(f"{where}.{k}: header values must be strings")
        out += [(k, wire_value(v)) for v in values]
    return out


def parse_answer(payload: Any, phase: Phase, label: str) -> CallbackAnswer:
    """A callback's reply, checked as strictly as a rule. HookError for anything that cannot
    be applied safely, including the callback's own `error` (fail closed)."""

    where = f"network hook {label}"
    if not isinstance(payload, dict):
        raise HookError(f"{where}: the callback answered with something other than an object")
    error = payload.get("error")
    if error:
        raise HookError(f"{where}: the callback failed: {str(error)[:200]}")
    action = str(payload.get("action") or "allow").strip().lower()
    if action not in ("allow", "block", "mutate"):
        raise HookError(f"{where}: the callback answered with unknown action {action[:40]!r}")
    out = CallbackAnswer(action=action)  # type: ignore[arg-type]
    req = payload.get("request")
    resp = payload.get("response")
    mutated = False
    if phase == "before" and isinstance(req, dict):
        if req.get("headers") is not None:
            pairs = _multi(req["headers"], where + ": request.headers")
            out.headers = [(check_header(k, v, _REQUEST_RESERVED, where), v) for k, v in pairs]
        if req.get("query") is not None:
            q = req["query"]
            if not isinstance(q, dict) or not all(isinstance(v, str) for v in q.values()):
                raise HookError(f"{where}: request.query must be an object of strings")
            out.query = [(k, _query_value(v, where)) for k, v in q.items() if k]
        path = req.get("path")
        if path:
            if not isinstance(path, str):
                raise HookError(f"{where}: request.path must be a string")
            out.path = check_path(path, where)
        mutated = out.headers is not None or out.query is not None or bool(out.path)
    elif phase == "after" and isinstance(resp, dict):
        if resp.get("headers") is not None:
            pairs = _multi(resp["headers"], where + ": response.headers")
            # The framing headers it got back with the response are ours to set again.
            out.headers = [(check_header(k, v, frozenset(), where), v) for k, v in pairs
                           if k.lower() not in _RESPONSE_FRAMING]
        repl = resp.get("body_replacements")
        if repl:
            if not isinstance(repl, list) or not all(isinstance(r, dict) for r in repl):
                raise HookError(f"{where}: response.body_replacements must be a list of objects")
            out.body_replacements = tuple(
                Replacement(str(r.get("find")).encode(), str(r.get("replace") or "").encode())
                for r in repl if isinstance(r.get("find"), str) and r.get("find"))
        body = resp.get("set_body_base64")
        if body:
            if not isinstance(body, str) or len(body) > (MAX_BODY // 3 + 1) * 4:
                raise HookError(f"{where}: response.set_body_base64 is not base64 or larger "
                                f"than {MAX_BODY} bytes")
            try:
                out.set_body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise HookError(f"{where}: response.set_body_base64 is not base64") from None
        mutated = (out.headers is not None or bool(out.body_replacements)
                   or out.set_body is not None)
    if mutated and out.action == "allow":
        out.action = "mutate"
    return out


def apply_answer_to_request(answer: CallbackAnswer, view: RequestView) -> None:
    if answer.headers is not None:
        view.headers = list(answer.headers)
        view.changed = True
    if answer.query is not None:
        view.set_query(answer.query)
    if answer.path:
        _, sep, q = view.target.partition("?")
        view.target = answer.path + (sep + q if sep else "")
        view.changed = True


# -- responses ------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponsePlan:
    """What the `after` rules decided for one response."""

    headers: list[tuple[str, str]]  # end-to-end headers (framing removed)
    headers_changed: bool = False
    replacements: list[Replacement] = field(default_factory=list)
    set_body: bytes | None = None
    rules: list[str] = field(default_factory=list)

    @property
    def is_sse(self) -> bool:
        return is_sse(self.headers)

    @property
    def body_changes(self) -> bool:
        return self.set_body is not None or bool(self.replacements)

    @property
    def buffered(self) -> bool:
        """Does the body have to be read whole (else streamed, SSE lines)."""
        return self.set_body is None and bool(self.replacements) and not self.is_sse

    @property
    def changed(self) -> bool:
        return self.headers_changed or self.body_changes


def is_sse(headers: Iterable[tuple[str, str]]) -> bool:
    return any(k.lower() == "content-type" and v.strip().lower().startswith("text/event-stream")
               for k, v in headers)


def apply_response_rule(rule: Rule, plan: ResponsePlan) -> None:
    headers = _edit_headers(plan.headers, rule.set_response_headers,
                            rule.delete_response_headers)
    if headers != plan.headers:
        plan.headers, plan.headers_changed = headers, True
    plan.replacements += rule.body_replacements


def apply_answer_to_response(answer: CallbackAnswer, plan: ResponsePlan) -> None:
    if answer.headers is not None:
        plan.headers, plan.headers_changed = list(answer.headers), True
    if answer.set_body is not None:
        plan.set_body = answer.set_body
    plan.replacements += answer.body_replacements


def replace_all(body: bytes, replacements: Iterable[Replacement]) -> bytes:
    for r in replacements:
        body = body.replace(r.find, r.replace)
    return body


class SseRewriter:
    """Applies literal replacements to the payload of `data:` lines of an event stream as it
    arrives: each complete line goes out at once, only an unfinished line is held (up to
    MAX_SSE_LINE, then HookError). Line endings are kept as they came."""

    __slots__ = ("_pending", "_replacements")

    def __init__(self, replacements: Iterable[Replacement]) -> None:
        self._replacements = tuple(replacements)
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        # The last line end: LF, or a CR not at the very end (a final CR may be half a CRLF).
        end = max(self._pending.rfind(b"\n"), self._pending.rfind(b"\r", 0, -1))
        if end < 0:
            # A lone CR may end a line too, but it may also be the first half of CRLF: held.
            if len(self._pending) > MAX_SSE_LINE:
                raise HookError(f"an event-stream line longer than {MAX_SSE_LINE} bytes")
            return b""
        done = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        return b"".join(self._line(line) for line in done.splitlines(keepends=True))

    def finish(self) -> bytes:
        tail = bytes(self._pending)
        self._pending.clear()
        return self._line(tail) if tail else b""

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        body = line[5:]
        stripped = body.rstrip(b"\r\n")
        ending = body[len(stripped):]
        return b"data:" + replace_all(stripped, self._replacements) + ending
