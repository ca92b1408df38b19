"""Runs against whichever `matchlock` SDK the interpreter imports (this project's or the
official one): builds sandboxes, calls methods, prints what came back as JSON."""

import dataclasses
import json
import sys

from matchlock import (
    Client,
    ImageConfig,
    MountConfig,
    NetworkBodyTransform,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
)

SCENARIOS = {
    "minimal": lambda: Sandbox("alpine:latest"),
    "network": lambda: (Sandbox("python:3.12-alpine").allow_host("a.test", "*.b.test")
                        .add_secret("API_KEY", "sk-value-123456", "a.test")
                        .add_secret_with_placeholder("TOK", "tok-value-123456", "PH_TOK", "b.test")
                        .with_dns_servers("1.1.1.1").with_hostname("box.internal")
                        .with_network_mtu(1400).add_host("db.internal", "10.0.0.5")),
    "private": lambda: Sandbox("alpine").allow_private_ips().allow_host("x.test"),
    "no_network": lambda: Sandbox("alpine").with_no_network().with_hostname("h"),
    "resources": lambda: (Sandbox("alpine").with_cpus(2).with_memory(256).with_disk_size(900)
                          .with_timeout(30).with_privileged().with_env("A", "1")
                          .with_env_map({"B": "2"})),
    "mounts": lambda: (Sandbox("alpine").with_workspace("/workspace")
                       .mount_host_dir("/workspace/src", "/tmp/src", owner_uid=1000)
                       .mount_host_dir_readonly("/workspace/ro", "/tmp/ro")
                       .mount_overlay("/workspace/ov", "/tmp/ov").mount_memory("/workspace/m")
                       .mount("/workspace/x", MountConfig(type="memory"))),
    "image_config": lambda: (Sandbox("alpine").with_user("1000:1000").with_entrypoint("sh", "-c")
                             .with_image_config(ImageConfig(working_dir="/w", cmd=["true"],
                                                            env={"K": "v"}))),
    "interception": lambda: (Sandbox("alpine").allow_host("a.test").with_network_interception(
        NetworkInterceptionConfig(rules=[
            NetworkHookRule(name="h", phase="before", hosts=["a.test"], methods=["GET"],
                            path="/v1/*", action="mutate", set_headers={"X-A": "1"},
                            delete_headers=["Cookie"], set_query={"q": "1"},
                            delete_query=["z"], rewrite_path="/v2"),
            NetworkHookRule(phase="after", set_response_headers={"X-B": "2"},
                            delete_response_headers=["Server"],
                            body_replacements=[NetworkBodyTransform("a", "b"),
                                               NetworkBodyTransform("c")], timeout_ms=50),
            NetworkHookRule(action="block", hosts=["*.evil.test"]),
        ]))),
    "forced": lambda: Sandbox("alpine").with_network_interception(),
    "ports": lambda: (Sandbox("alpine").with_port_forward(18080, 8080)
                      .with_port_forward_addresses("127.0.0.1", "::1")),
}


def plain(x: object) -> object:
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x  # type: ignore[arg-type]


def main() -> None:
    name = sys.argv[1]
    out: dict[str, object] = {}
    with Client() as c:
        out["id"] = c.launch(SCENARIOS[name]())
        if name == "minimal":
            out["exec"] = plain(c.exec("echo hi", working_dir="/tmp"))
            out["read"] = list(c.read_file("/f"))
            c.write_file("/g", b"\x00\xff", mode=0o600)
            c.write_file("/h", "text")
            out["ls"] = [plain(f) for f in c.list_files("/")]
            out["pf"] = [plain(b) for b in c.port_forward("18080:8080", "9000")]
    print(json.dumps(out, sort_keys=True))


main()
