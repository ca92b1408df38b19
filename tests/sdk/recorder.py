"""A stand-in for `matchlock rpc` that records what an SDK sends and answers plausibly: the
oracle that compares this project's SDK with the official one, byte for byte, without VMs."""

import json
import os
import sys
import typing

ANSWERS = {
    "create": {"id": "vm-recorded"},
    "exec": {"exit_code": 3, "stdout": "aMOpCg==", "stderr": "ZXJy", "duration_ms": 7},
    "read_file": {"content": "AAEC/w=="},
    "list_files": {"files": [{"name": "a", "size": 1, "mode": 420, "is_dir": False,
                              "mod_time": "0001-01-01T00:00:00Z"}]},
    "port_forward": {"bindings": [{"address": "127.0.0.1", "local_port": 18080,
                                   "remote_port": 8080}]},
}


def main() -> None:
    if sys.argv[1:] != ["rpc"]:
        sys.exit(2)
    with open(os.environ["RECORD_TO"], "a") as log:
        serve(log)


def serve(log: "typing.TextIO") -> None:
    for line in sys.stdin:
        msg = json.loads(line)
        log.write(json.dumps({"method": msg.get("method"), "params": msg.get("params")}) + "\n")
        log.flush()
        if msg.get("method") == "read_file_stream":
            read_file_stream(msg)
        elif "id" in msg:
            out = {"jsonrpc": "2.0", "result": ANSWERS.get(msg["method"], {}), "id": msg["id"]}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()


def read_file_stream(msg: "dict[str, typing.Any]") -> None:
    """This project's SDK reads files with `read_file_stream` over its data channel (two
    pipes named in the environment): the same content as `read_file`'s answer above, as the
    real server sends it (content frames, an empty frame, then the answer)."""
    import base64
    import struct

    content = base64.b64decode(ANSWERS["read_file"]["content"])
    w = int(os.environ["MATCHLOCK_RPC_DATA_FDS"].split(",")[1])
    for data in (content, b""):
        os.write(w, struct.pack(">QI", msg["id"], len(data)) + data)
    out = {"jsonrpc": "2.0", "result": {"size": len(content)}, "id": msg["id"]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


main()
