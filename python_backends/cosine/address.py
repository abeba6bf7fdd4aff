"""host:port addresses (a spec's node urls, the relay's ends), split in one place for the backends and the client."""
from __future__ import annotations


def split_host_port(address: str, default_host: str | None = None) -> tuple[str, int]:
    """"host:port" -> (host, port); "port" or ":port" takes `default_host` where there is one. ValueError else."""
    host, _, port = address.rpartition(":")
    host = host or default_host
    if not host or not port.isdigit():
        raise ValueError(f"must be {'[host:]port' if default_host else 'host:port'}, got {address!r}")
    return host, int(port)
