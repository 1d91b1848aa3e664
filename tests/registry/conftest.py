"""Fixtures for the registry tests.

Every test gets its own socket directory under /tmp (pytest's tmp_path can exceed the
108-byte AF_UNIX limit) and its own server process, so tests never share state.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from registry_helpers import HolderProcess, RegistryProcess


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_registry(socket_dir: str) -> Iterator:
    """Factory: start_registry(*cli_args) -> RegistryProcess; stopped at teardown."""
    started: list[RegistryProcess] = []

    def start(*args: str) -> RegistryProcess:
        server = RegistryProcess(os.path.join(socket_dir, "registry.sock"), *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def registry(start_registry) -> RegistryProcess:
    return start_registry("--capacity", "1000")


@pytest.fixture
def holders() -> Iterator:
    """Factory: holders(socket_path, ns, name, keys, ...) -> HolderProcess; killed at teardown."""
    spawned: list[HolderProcess] = []

    def spawn(*args, **kwargs) -> HolderProcess:
        holder = HolderProcess(*args, **kwargs)
        spawned.append(holder)
        return holder

    yield spawn
    for holder in spawned:
        holder.close()
