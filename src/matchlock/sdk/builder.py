"""`Sandbox(image)`: a fluent builder of `CreateOptions` (every method returns the builder).

    sandbox = (Sandbox("python:3.12-alpine")
               .allow_host("api.anthropic.com")
               .add_secret("ANTHROPIC_API_KEY", key, "api.anthropic.com"))
    with Client() as client:
        client.launch(sandbox)
"""

from __future__ import annotations

from matchlock.sdk.types import (
    CreateOptions,
    HostIPMapping,
    ImageConfig,
    MountConfig,
    NetworkInterceptionConfig,
    PortForward,
    Secret,
    VFSInterceptionConfig,
)


class Sandbox:
    def __init__(self, image: str) -> None:
        self._opts = CreateOptions(image=image)

    def options(self) -> CreateOptions:
        return self._opts

    # resources and identity
    def with_privileged(self) -> Sandbox:
        self._opts.privileged = True
        return self

    def with_kernel(self, ref: str) -> Sandbox:
        self._opts.kernel_ref = ref
        return self

    def with_cpus(self, cpus: float) -> Sandbox:
        self._opts.cpus = cpus
        return self

    def with_memory(self, mb: int) -> Sandbox:
        self._opts.memory_mb = mb
        return self

    def with_disk_size(self, mb: int) -> Sandbox:
        self._opts.disk_size_mb = mb
        return self

    def with_timeout(self, seconds: int) -> Sandbox:
        self._opts.timeout_seconds = seconds
        return self

    def with_hostname(self, hostname: str) -> Sandbox:
        self._opts.hostname = hostname
        return self

    def with_env(self, name: str, value: str) -> Sandbox:
        self._opts.env[name] = value
        return self

    def with_env_map(self, env: dict[str, str]) -> Sandbox:
        self._opts.env.update(env)
        return self

    # network
    def allow_host(self, *hosts: str) -> Sandbox:
        self._opts.allowed_hosts.extend(hosts)
        return self

    def add_host(self, host: str, ip: str) -> Sandbox:
        self._opts.add_hosts.append(HostIPMapping(host=host, ip=ip))
        return self

    def block_private_ips(self) -> Sandbox:
        return self.with_block_private_ips(True)

    def allow_private_ips(self) -> Sandbox:
        return self.with_block_private_ips(False)

    def with_block_private_ips(self, enabled: bool) -> Sandbox:
        self._opts.block_private_ips = enabled
        self._opts.block_private_ips_set = True
        return self

    def unset_block_private_ips(self) -> Sandbox:
        self._opts.block_private_ips = False
        self._opts.block_private_ips_set = False
        return self

    def with_network_mtu(self, mtu: int) -> Sandbox:
        self._opts.network_mtu = mtu
        return self

    def with_no_network(self) -> Sandbox:
        self._opts.no_network = True
        return self

    def with_dns_servers(self, *servers: str) -> Sandbox:
        self._opts.dns_servers.extend(servers)
        return self

    def with_network_interception(self, config: NetworkInterceptionConfig | None = None
                                  ) -> Sandbox:
        self._opts.force_interception = True
        self._opts.network_interception = config
        return self

    def add_secret(self, name: str, value: str, *hosts: str) -> Sandbox:
        self._opts.secrets.append(Secret(name=name, value=value, hosts=list(hosts)))
        return self

    def add_secret_with_placeholder(self, name: str, value: str, placeholder: str,
                                    *hosts: str) -> Sandbox:
        self._opts.secrets.append(Secret(name=name, value=value, hosts=list(hosts),
                                         placeholder=placeholder))
        return self

    def with_port_forward(self, local_port: int, remote_port: int) -> Sandbox:
        self._opts.port_forwards.append(PortForward(local_port, remote_port))
        return self

    def with_port_forward_addresses(self, *addresses: str) -> Sandbox:
        self._opts.port_forward_addresses.extend(addresses)
        return self

    # files
    def with_workspace(self, path: str) -> Sandbox:
        self._opts.workspace = path
        return self

    def with_vfs_interception(self, config: VFSInterceptionConfig) -> Sandbox:
        self._opts.vfs_interception = config
        return self

    def mount(self, guest_path: str, config: MountConfig) -> Sandbox:
        self._opts.mounts[guest_path] = config
        return self

    def mount_host_dir(self, guest_path: str, host_path: str, *, owner_uid: int | None = None,
                       owner_gid: int | None = None) -> Sandbox:
        return self.mount(guest_path, MountConfig("host_fs", host_path, owner_uid=owner_uid,
                                                  owner_gid=owner_gid))

    def mount_host_dir_readonly(self, guest_path: str, host_path: str, *,
                                owner_uid: int | None = None,
                                owner_gid: int | None = None) -> Sandbox:
        return self.mount(guest_path, MountConfig("host_fs", host_path, readonly=True,
                                                  owner_uid=owner_uid, owner_gid=owner_gid))

    def mount_memory(self, guest_path: str) -> Sandbox:
        return self.mount(guest_path, MountConfig("memory"))

    def mount_overlay(self, guest_path: str, host_path: str) -> Sandbox:
        return self.mount(guest_path, MountConfig("overlay", host_path))

    # the image's configuration
    def _image_config(self) -> ImageConfig:
        if self._opts.image_config is None:
            self._opts.image_config = ImageConfig()
        return self._opts.image_config

    def with_user(self, user: str) -> Sandbox:
        self._image_config().user = user
        return self

    def with_entrypoint(self, *entrypoint: str) -> Sandbox:
        self._image_config().entrypoint = list(entrypoint)
        return self

    def with_image_config(self, config: ImageConfig) -> Sandbox:
        """Fields set in `config` override; empty ones leave what is there."""
        mine = self._image_config()
        for key in ("user", "working_dir", "entrypoint", "cmd", "env"):
            value = getattr(config, key)
            if value:
                setattr(mine, key, value)
        return self
