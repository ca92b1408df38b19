"""A client for one repository of an OCI distribution-spec registry (the pull side).

    GET /v2/                              ping: picks HTTPS or HTTP, learns the auth scheme
    GET /v2/<name>/manifests/<reference>  manifest or index (by tag or digest)
    GET /v2/<name>/blobs/<digest>         config and layers, with `Range` to resume

HTTPS is verified against the system roots plus configured CAs. As with Docker, plain HTTP is
tried only for loopback registries and those marked insecure, and only after HTTPS failed for
another reason than the certificate. A certificate that does not verify is accepted only from
a registry marked insecure (Docker also accepts it from loopback; we do not).
Every response body is checked by the caller against a digest; nothing here trusts the
registry's word for what it sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from matchlock.errors import ImageError
from matchlock.image.auth import Authenticator, unauthorized
from matchlock.image.credentials import DockerCredentials
from matchlock.image.digest import CHUNK
from matchlock.image.distribution import (
    MANIFEST_ACCEPT,
    RETRIES,
    RETRY_STATUSES,
    SCHEMA1_TYPES,
    error_summary,
    parse_content_range,
    retry_after,
    sniff_media_type,
)
from matchlock.image.oci import INDEX_TYPES, MANIFEST_TYPES, MAX_DOCUMENT_BYTES
from matchlock.image.reference import DEFAULT_REGISTRY, Reference
from matchlock.image.registry_config import RegistrySettings, is_loopback

# Docker Hub's name in references is not the host that serves its registry API.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_USER_AGENT = "matchlock"


def api_host(registry: str) -> str:
    return DOCKER_HUB_API_HOST if registry == DEFAULT_REGISTRY else registry


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    digest: str
    raw: bytes


@dataclass
class BlobResponse:
    start: int  # the offset the body starts at: the requested one, or 0 if Range was ignored
    chunks: Iterator[bytes]


class RangeNotSatisfiable(Exception):
    """HTTP 416: the partial download is not a prefix of this blob; start again."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    return next((c for c in _causes(exc) if isinstance(c, ssl.SSLCertVerificationError)), None)


def _unreachable(registry: str, exc: BaseException, timeout_s: float) -> ImageError:
    if isinstance(exc, httpx.TimeoutException):
        why = f"no answer within {timeout_s:g}s"
    elif any(isinstance(c, ConnectionRefusedError) for c in _causes(exc)):
        why = "connection refused"
    else:
        why = str(exc) or type(exc).__name__
    return ImageError(
        f"cannot reach registry {registry}: {why}",
        hint="check the registry address and your network (for a registry without TLS, pass "
        "--insecure-registry HOST:PORT)",
    )


class RegistryClient:
    """Manifests and blobs of `ref.repository` on `ref.registry`; usable from many threads."""

    def __init__(
        self,
        ref: Reference,
        settings: RegistrySettings,
        credentials: DockerCredentials | None = None,
    ) -> None:
        self.ref = ref
        self.registry = ref.registry
        self.host = api_host(ref.registry)
        self.settings = settings
        creds_source = credentials or DockerCredentials(settings.docker_config)
        self.auth = Authenticator(
            ref.registry,
            f"repository:{ref.repository}:pull",
            lambda: creds_source.get(ref.registry),
            settings.allows_http,
        )
        self._connect_lock = threading.Lock()
        self._base: str | None = None
        self._http = self._client(verify=True)

    # -- connection ------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # the system roots
        for path in self.settings.ca_certs:
            try:
                context.load_verify_locations(cafile=str(path))
            except (OSError, ssl.SSLError) as exc:
                raise ImageError(
                    f"cannot load CA certificate {path}: {getattr(exc, 'strerror', None) or exc}",
                    hint="pass a PEM file with --ca-cert (or fix registry.ca_certs in the "
                    "config file)",
                ) from None
        return context

    def _client(self, *, verify: bool) -> httpx.Client:
        timeout = self.settings.timeout_s
        return httpx.Client(
            verify=self._ssl_context() if verify else False,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,  # blobs are often served from storage elsewhere
            limits=httpx.Limits(max_connections=self.settings.jobs + 2),
            headers={"User-Agent": _USER_AGENT},
            # Environment proxies apply to remote registries, never to loopback ones.
            trust_env=not is_loopback(self.host),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ping(self, base: str) -> None:
        response = self._http.get(f"{base}/v2/")
        response.read()
        if response.status_code == 401:
            _, generation = self.auth.current()
            # Learning the scheme now means the first real request already carries a token.
            self.auth.answer(self._http, response.headers.get_list("www-authenticate"),
                             generation)
        elif response.status_code != 200 and response.status_code < 500:
            raise ImageError(
                f"{self.registry} does not look like an OCI registry "
                f"(GET /v2/ answered HTTP {response.status_code})",
                hint="check the registry address",
            )

    def _connect(self) -> str:
        """Find the scheme that works (once); returns the base URL."""
        with self._connect_lock:
            if self._base is not None:
                return self._base
            base = f"https://{self.host}"
            try:
                self._ping(base)
            except httpx.ConnectError as exc:
                base = self._fallback(exc)
            except httpx.HTTPError as exc:
                raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
            self._base = base
            return base

    def _fallback(self, exc: httpx.ConnectError) -> str:
        cert = _cert_error(exc)
        if cert is not None and self.settings.is_insecure(self.registry):
            self._http.close()
            self._http = self._client(verify=False)
            return self._ping_or_fail(f"https://{self.host}")
        if cert is not None:
            raise ImageError(
                f"the TLS certificate of {self.registry} is not trusted: "
                f"{cert.verify_message or cert.reason}",
                hint="pass the registry's CA with --ca-cert FILE (or registry.ca_certs in the "
                "config file)",
            ) from None
        refused = any(isinstance(c, ConnectionRefusedError) for c in _causes(exc))
        if not refused and self.settings.allows_http(self.registry):
            # Typically the TLS handshake met a plain-HTTP server ("wrong version number").
            return self._ping_or_fail(f"http://{self.host}")
        raise _unreachable(self.registry, exc, self.settings.timeout_s) from None

    def _ping_or_fail(self, base: str) -> str:
        try:
            self._ping(base)
        except httpx.HTTPError as exc:
            raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
        return base

    # -- requests --------------------------------------------------------------------------

    def _send(
        self, path: str, headers: dict[str, str], what: str, *, wrap_errors: bool = True
    ) -> httpx.Response:
        """GET `path` with auth, answering one challenge and retrying overloaded servers.

        Returns a streaming response (the caller closes it). Transport errors become an
        ImageError unless `wrap_errors` is off (blob downloads retry them and resume).
        """
        base = self._connect()
        reauthed = False
        attempt = 0
        while True:
            header, generation = self.auth.current()
            request_headers = dict(headers)
            if header is not None:
                request_headers["Authorization"] = header
            request = self._http.build_request("GET", base + path, headers=request_headers)
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if not wrap_errors:
                    raise
                raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
            except httpx.HTTPError as exc:  # e.g. a redirect loop
                raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
            status = response.status_code
            if status == 401 and not reauthed:
                challenges = response.headers.get_list("www-authenticate")
                response.close()
                reauthed = True
                if self.auth.answer(self._http, challenges, generation):
                    continue
                raise unauthorized(self.registry, what, self.auth.credentials)
            if status in (401, 403):
                response.close()
                raise unauthorized(self.registry, what, self.auth.credentials)
            if status in RETRY_STATUSES and attempt < RETRIES:
                delay = retry_after(response.headers.get("retry-after"), attempt)
                response.close()
                attempt += 1
                time.sleep(delay)
                continue
            return response

    def _http_error(self, response: httpx.Response, what: str) -> ImageError:
        body = _read_capped(response, 65536)
        summary = error_summary(body)
        detail = f" ({summary})" if summary else ""
        if response.status_code == 404:
            return ImageError(
                f"{what} not found on {self.registry}{detail}",
                hint="check the repository name and tag",
            )
        if response.status_code == 429:
            return ImageError(
                f"{self.registry} is rate-limiting pulls (HTTP 429){detail}",
                hint="wait and try again, or log in for a higher limit",
            )
        return ImageError(
            f"{self.registry} answered HTTP {response.status_code} for {what}{detail}",
            hint="try again later; if it persists, check the registry",
        )

    def manifest(self, reference: str, what: str) -> FetchedManifest:
        """The manifest or index `reference` (tag or digest), its bytes verified if by digest."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        headers = {"Accept": MANIFEST_ACCEPT, "Accept-Encoding": "identity"}
        response = self._send(path, headers, what)
        try:
            if response.status_code != 200:
                raise self._http_error(response, what)
            raw = _read_capped(response, MAX_DOCUMENT_BYTES + 1)
        except httpx.HTTPError as exc:
            raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
        finally:
            response.close()
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise ImageError(
                f"{what} on {self.registry} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB",
                hint="this is not an image manifest; check the name",
            )
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        claimed = response.headers.get("docker-content-digest")
        expected = reference if reference.startswith("sha256:") else None
        if claimed and claimed.startswith("sha256:") and expected is None:
            expected = claimed
        if expected is not None and digest != expected:
            raise ImageError(
                f"{what} from {self.registry} has digest {digest} but {expected} was "
                "expected: the data is corrupt or was tampered with",
                hint="do not use this registry's copy; try again or contact its operator",
            )
        media_type = sniff_media_type(response.headers.get("content-type"), raw)
        if media_type in SCHEMA1_TYPES:
            raise ImageError(
                f"{what} uses the Docker schema 1 manifest format, which is not supported",
                hint="push the image again with a current tool (schema 2 or OCI)",
            )
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            raise ImageError(
                f"{what} on {self.registry} is not an image (media type {media_type!r})",
                hint="check the name; only container images can be pulled",
            )
        return FetchedManifest(media_type, digest, raw)

    def read_blob(self, digest: str, size: int, what: str) -> bytes:
        """A small blob into memory (at most `size` + 1 bytes: the caller verifies it)."""
        out = bytearray()
        try:
            with self.blob(digest, 0, what) as response:
                for chunk in response.chunks:
                    out += chunk
                    if len(out) > size:
                        break
        except httpx.HTTPError as exc:
            raise _unreachable(self.registry, exc, self.settings.timeout_s) from None
        return bytes(out)

    @contextlib.contextmanager
    def blob(self, digest: str, offset: int, what: str) -> Iterator[BlobResponse]:
        """Stream blob `digest` from `offset` (Range); the body may start at 0 instead.

        Raises RangeNotSatisfiable for HTTP 416. Transport errors while reading the body are
        left to the caller (httpx.TransportError), which resumes.
        """
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        path = f"/v2/{self.ref.repository}/blobs/{digest}"
        response = self._send(path, headers, what, wrap_errors=False)
        try:
            if response.status_code == 416 and offset:
                raise RangeNotSatisfiable()
            if response.status_code == 206 and offset:
                parsed = parse_content_range(response.headers.get("content-range"))
                if parsed is None or parsed[0] != offset:
                    raise RangeNotSatisfiable()  # a range we did not ask for: start over
                start = offset
            elif response.status_code == 200:
                start = 0
            else:
                raise self._http_error(response, what)
            yield BlobResponse(start, response.iter_raw(CHUNK))
        finally:
            response.close()


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    out = bytearray()
    for chunk in response.iter_raw(CHUNK):
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out)
