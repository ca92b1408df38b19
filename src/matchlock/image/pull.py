"""Pull an image from a registry into the local store.

1. Resolve the reference to one image manifest: tag or digest -> manifest, or index -> the
   entry for the host platform -> manifest. Every document is checked against its digest.
2. Fetch and check the config (platform, runtime settings, one diff_id per layer).
3. Download the layers that are not in the store yet, several at a time (`download.py`:
   verified while streaming, resumable).
4. Build the root filesystem, which applies every layer and so rejects hostile ones, and
   only then name the image: a name never points at an image that cannot run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

from matchlock.image.config import image_config_from_json
from matchlock.image.digest import sha256_digest, verify_digest
from matchlock.image.download import BlobDownload, Cancelled, Control, DiskFull
from matchlock.image.oci import (
    INDEX_TYPES,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    Manifest,
    Platform,
    diff_ids,
    get_str,
    malformed,
    parse_index,
    parse_json_object,
    parse_manifest,
)
from matchlock.image.platforms import check_config_platform, host_platform, select_manifest
from matchlock.image.progress import PullProgress
from matchlock.image.reference import Reference, parse_reference
from matchlock.image.registry import RegistryClient
from matchlock.image.registry_config import RegistrySettings, load_settings
from matchlock.image.store import ImageStore, StoredImage

Log = Callable[[str], None]
_MAX_INDEX_DEPTH = 4


def _quiet(_line: str) -> None:
    pass


@dataclass(frozen=True)
class ResolvedManifest:
    digest: str
    raw: bytes
    manifest: Manifest


def resolve_manifest(client: RegistryClient, ref: Reference, want: Platform) -> ResolvedManifest:
    """The image manifest `ref` names for platform `want` (through indexes if need be)."""
    what = f"image {ref}"
    fetched = client.manifest(ref.digest or ref.tag or "latest", what)
    for _ in range(_MAX_INDEX_DEPTH):
        if fetched.media_type not in INDEX_TYPES:
            manifest = parse_manifest(fetched.raw, f"manifest of {ref}")
            return ResolvedManifest(fetched.digest, fetched.raw, manifest)
        chosen = select_manifest(parse_index(fetched.raw, f"index of {ref}"), want, what)
        fetched = client.manifest(chosen.digest, f"{what} ({want})")  # verified by digest
        if len(fetched.raw) != chosen.size:
            raise malformed(f"manifest {chosen.digest}", "its size differs from the index's")
    raise malformed(f"index of {ref}", "image indexes are nested too deeply")


def fetch_document(client: RegistryClient, desc: Descriptor, what: str) -> bytes:
    """A small blob (the config), read into memory and verified."""
    if desc.size > MAX_DOCUMENT_BYTES:
        raise malformed(what, f"it is larger than {MAX_DOCUMENT_BYTES >> 20} MiB")
    raw = client.read_blob(desc.digest, desc.size, what)
    verify_digest(sha256_digest(raw), desc.digest, f"{what} from {client.registry}")
    return raw


def check_config(raw: bytes, layers: int, want: Platform, what: str) -> None:
    config = parse_json_object(raw, what)
    check_config_platform(
        get_str(config, "os", what),
        get_str(config, "architecture", what),
        get_str(config, "variant", what),
        want,
        what,
    )
    image_config_from_json(config)  # an unusable config fails now, not at the first run
    ids = diff_ids(config, what)
    if ids is not None and len(ids) != layers:
        raise malformed(what, f"it lists {len(ids)} diff_ids for {layers} layers")


def _unique(layers: Iterable[Descriptor]) -> list[Descriptor]:
    seen: dict[str, Descriptor] = {}
    for layer in layers:
        seen.setdefault(layer.digest, layer)
    return list(seen.values())


def download_layers(
    store: ImageStore,
    client: RegistryClient,
    layers: tuple[Descriptor, ...],
    jobs: int,
    progress: PullProgress,
) -> None:
    """Fetch missing layers in parallel; the first failure stops the others."""
    unique = _unique(layers)
    present = {d.digest for d in unique if store.has_blob(d.digest)}
    progress.begin([(d.digest, d.size) for d in unique], present)
    todo = [d for d in unique if d.digest not in present]
    if not todo:
        return
    count = len(layers)
    index = {d.digest: i for i, d in enumerate(layers, 1)}
    control = Control()
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo))),
                              thread_name_prefix="pull")
    futures: list[Future[None]] = []
    try:
        for desc in todo:
            what = f"layer {index[desc.digest]}/{count} ({desc.digest})"
            job = BlobDownload(store, client, desc, what, progress, control)
            futures.append(pool.submit(job.run))
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        # After the first failure (or Ctrl-C) the other downloads stop at their next chunk;
        # their partial files stay for the next pull to resume.
        if not all(f.done() and f.exception() is None for f in futures):
            if any(f.done() and isinstance(f.exception(), DiskFull) for f in futures):
                control.discard.set()
            control.cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if future.cancelled():
            continue
        error = future.exception()
        if error is not None and not isinstance(error, Cancelled):
            raise error


def pull_image(
    store: ImageStore,
    name: str,
    *,
    settings: RegistrySettings | None = None,
    progress: PullProgress | None = None,
    extra_tags: Iterable[str] = (),
    log: Log = _quiet,
) -> StoredImage:
    """Pull `name` from its registry, build its root filesystem, and name it in the store."""
    ref = parse_reference(name)
    tags = list(extra_tags)
    for tag in tags:
        parse_reference(tag)  # a bad -t fails before the download
    settings = settings or load_settings()
    progress = progress or PullProgress()
    want = host_platform()
    with RegistryClient(ref, settings) as client:
        resolved = resolve_manifest(client, ref, want)
        manifest = resolved.manifest
        config_raw = fetch_document(client, manifest.config, f"config of {ref}")
        check_config(config_raw, len(manifest.layers), want, f"config of {ref}")
        with store.lease():
            try:
                download_layers(store, client, manifest.layers, settings.jobs, progress)
            finally:
                progress.close()
            store.put_blob_stream(BytesIO(config_raw), manifest.config.digest,
                                  what="image config")
            store.put_blob_stream(BytesIO(resolved.raw), resolved.digest, what="image manifest")
            layers = [d.digest for d in manifest.layers]
            _check_sizes(store, manifest)
            candidate = StoredImage(name, resolved.digest, manifest.config.digest, tuple(layers),
                                    0, datetime.now(UTC))
            store.rootfs(candidate, log)
            image = store.tag(name, resolved.digest, manifest.config.digest, layers,
                              allow_digest=True)
            for tag in tags:
                store.tag(tag, resolved.digest, manifest.config.digest, layers)
    return image


def _check_sizes(store: ImageStore, manifest: Manifest) -> None:
    for layer in manifest.layers:
        size = store.blob_path(layer.digest).stat().st_size
        if size != layer.size:
            raise malformed(f"layer {layer.digest}",
                            f"its size is {size} bytes, the manifest says {layer.size}")

