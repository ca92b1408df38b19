"""`matchlock pull`: fetch an image from a registry into the local store."""

from __future__ import annotations

import click

_MB = 1_000_000


@click.command()
@click.option("--force", is_flag=True,
              help="Ask the registry even if the image is already in the local store.")
@click.option("-t", "--tag", "tags", multiple=True, metavar="TAG",
              help="Also name the image TAG locally (repeatable).")
@click.option("--ca-cert", "ca_certs", multiple=True, metavar="FILE",
              help="Trust this CA certificate (PEM) besides the system roots (repeatable).")
@click.option("--insecure-registry", "insecure", multiple=True, metavar="HOST[:PORT]",
              help="Allow plain HTTP and unverified TLS for this registry (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.argument("image")
def pull(image: str, force: bool, tags: tuple[str, ...], ca_certs: tuple[str, ...],
         insecure: tuple[str, ...], quiet: bool) -> None:
    """Pull IMAGE (NAME[:TAG][@DIGEST]) from its registry and build its root filesystem.

    Registry settings (insecure registries, CA certificates, parallel downloads) can also
    be set in ~/.config/matchlock/config.toml; see docs/images.md.
    """
    from matchlock.image.progress import make_progress
    from matchlock.image.pull import pull_image
    from matchlock.image.reference import parse_reference
    from matchlock.image.registry_config import load_settings
    from matchlock.image.store import ImageStore

    parse_reference(image)  # a bad name fails before anything else
    for tag in tags:
        parse_reference(tag)

    def log(line: str) -> None:
        if not quiet:
            click.echo(f"matchlock: {line}", err=True)

    store = ImageStore()
    click.echo(f"Pulling {image}...", err=True)
    cached = None if force else store.lookup(image)
    if cached is not None and store.has_blob(cached.config_digest):
        log("already in the local store (pass --force to ask the registry again)")
        stored = cached
        for tag in tags:
            store.tag(tag, stored.manifest_digest, stored.config_digest, list(stored.layers))
    else:
        settings = load_settings(insecure=insecure, ca_certs=ca_certs)
        stored = pull_image(store, image, settings=settings, progress=make_progress(quiet),
                            extra_tags=tags, log=log)
    for tag in tags:
        click.echo(f"Tagged: {tag}")
    click.echo(f"Digest: {stored.manifest_digest}")
    click.echo(f"Size: {stored.size / _MB:.1f} MB")
