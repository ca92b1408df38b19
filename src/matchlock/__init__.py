"""matchlock: run untrusted workloads in ephemeral microVMs with host-controlled egress."""

__version__ = "0.1.0"
