"""Exceptions a registry client raises (re-exported by ``client``)."""

from __future__ import annotations


class RegistryUnavailable(Exception):
    """No usable registry: connect failed, timeout, connection lost or a reply made no sense.

    The client that raised it is broken; make a new one to retry.
    """


class RegistryError(Exception):
    """The registry answered with ``ErrorReply``; ``code`` says why (see protocol.py)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
