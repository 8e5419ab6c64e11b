"""mlx.launch's hostfile, read and checked here so a bad one is a startup error, not a dead group.

The format is mlx.launch's own (mlx/_distributed_utils/common.py, Hostfile.from_file): a JSON
object ``{"backend": ..., "envs": [...], "hosts": [...]}`` or a bare list of hosts, each host
``{"ssh": NAME, "ips": [IP, ...], "rdma": [DEVICE or null, ...]}``. The checks mirror what
mlx.launch would refuse only after it started (launch_ring, launch_jaccl), without importing mlx.
Host i runs rank i; mlx.launch runs a host whose ``ssh`` is exactly 127.0.0.1 locally and
reaches any other name over ssh.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipc.runtime import DistributedBackend

LOCAL_HOST = "127.0.0.1"  # mlx.launch's spelling of "run it here, without ssh"


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...]
    rdma: tuple[str | None, ...]


@dataclass(frozen=True)
class Hostfile:
    hosts: tuple[Host, ...]
    backend: str | None  # the backend the file names, if any

    @property
    def all_local(self) -> bool:
        """Every rank on this machine: no ssh client, and the inherited environment reaches all."""
        return all(host.ssh == LOCAL_HOST for host in self.hosts)

    def ring_ports(self) -> int:
        """Ports the ring backend uses from --starting-port on: one per IP of every host."""
        return sum(len(host.ips) for host in self.hosts)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{what} must be a list of non-empty strings")
    return tuple(value)


def _host(index: int, entry: Any) -> Host:
    where = f"host {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with `ssh` (and `ips`, `rdma`)")
    unknown = set(entry) - {"ssh", "ips", "rdma"}
    if unknown:
        raise ValueError(f"{where} has unknown key `{sorted(unknown)[0]}` (keys: ssh, ips, rdma)")
    ssh = entry.get("ssh")
    if not isinstance(ssh, str) or not ssh:
        raise ValueError(f"{where} has no `ssh` host name")
    rdma = entry.get("rdma", [])
    if not isinstance(rdma, list) or not all(item is None or isinstance(item, str) for item in rdma):
        raise ValueError(f"{where}: `rdma` must be a list of device names or null")
    return Host(ssh=ssh, ips=_strings(entry.get("ips", []), f"{where}: `ips`"), rdma=tuple(rdma))


def read_hostfile(path: Path) -> Hostfile:
    """Parse one hostfile; ValueError (one line) when mlx.launch could not use it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"hostfile {path} is not valid JSON: {exc}") from None
    backend = None
    if isinstance(data, dict):
        unknown = set(data) - {"backend", "envs", "hosts"}
        if unknown:
            raise ValueError(f"hostfile {path} has unknown key `{sorted(unknown)[0]}` (keys: backend, envs, hosts)")
        backend = data.get("backend") or None
        if backend is not None and not isinstance(backend, str):
            raise ValueError(f"hostfile {path}: `backend` must be a string")
        _strings(data.get("envs", []), f"hostfile {path}: `envs`")
        data = data.get("hosts")
    if not isinstance(data, list):
        raise ValueError(f"hostfile {path} must hold a list of hosts, or an object with `hosts`")
    hosts = tuple(_host(i, entry) for i, entry in enumerate(data))
    if len(hosts) < 2:
        raise ValueError(f"hostfile {path} lists {len(hosts)} host(s): a group needs at least 2")
    return Hostfile(hosts=hosts, backend=backend)


def check_backend(hostfile: Hostfile, backend: DistributedBackend) -> None:
    """ValueError (one line) when `backend` cannot run over these hosts."""
    if hostfile.backend is not None and hostfile.backend != backend:
        raise ValueError(
            f"the hostfile names backend {hostfile.backend!r} but distributed_backend is {backend!r}: "
            "set distributed_backend to match"
        )
    if backend == "ring":
        _check_ring(hostfile)
    elif backend == "jaccl":
        _check_jaccl(hostfile)
    elif not hostfile.hosts[0].ips:  # nccl
        raise ValueError(f"host 0 ({hostfile.hosts[0].ssh}) has no `ips`: nccl's rendezvous is rank 0's first IP")


def _check_ring(hostfile: Hostfile) -> None:
    for i, host in enumerate(hostfile.hosts):
        if not host.ips:
            raise ValueError(f"host {i} ({host.ssh}) has no `ips`: the ring backend connects ranks by IP address")
        for ip in host.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(
                    f"host {i} ({host.ssh}): {ip!r} is not an IP address (the ring backend needs IPs)"
                ) from None


def _check_jaccl(hostfile: Hostfile) -> None:
    # mlx.launch's full-mesh jaccl: rank 0 coordinates at its first IP, and row i of the RDMA
    # table names host i's device towards every other host (null towards itself).
    hosts = hostfile.hosts
    if not hosts[0].ips:
        raise ValueError(f"host 0 ({hosts[0].ssh}) has no `ips`: jaccl's coordinator is rank 0's first IP")
    for i, host in enumerate(hosts):
        if len(host.rdma) != len(hosts):
            raise ValueError(
                f"host {i} ({host.ssh}) lists {len(host.rdma)} RDMA devices for {len(hosts)} hosts: "
                "jaccl needs one per host (null for itself)"
            )
        if host.rdma[i] is not None:
            raise ValueError(f"host {i} ({host.ssh}): its own RDMA entry (index {i}) must be null")
        missing = [j for j, device in enumerate(host.rdma) if j != i and device is None]
        if missing:
            raise ValueError(f"host {i} ({host.ssh}) has no RDMA device towards host {missing[0]}")
