"""`matchlock rpc`: the JSON-RPC server that the SDKs drive (docs/rpc.md)."""
