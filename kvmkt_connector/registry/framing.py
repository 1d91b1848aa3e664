"""Frames of the registry protocol: a 4-byte big-endian length, then msgpack of one message.

``MAX_FRAME_BYTES`` is enforced when encoding (we never send what the peer must refuse) and
when decoding, from the length header alone, so an oversized frame is refused before its
payload is buffered.
"""

from __future__ import annotations

import msgspec

from .protocol import FRAME_HEADER_BYTES, MAX_FRAME_BYTES, Reply, Request

# Encoders and decoders hold no per-message state; one of each is reused for speed.
_ENCODER = msgspec.msgpack.Encoder()
_REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER = msgspec.msgpack.Decoder(Reply)


class FrameError(Exception):
    """A frame that is too long or whose payload does not decode: the stream is unusable."""


def encode_frame(message: msgspec.Struct) -> bytes:
    buf = bytearray(FRAME_HEADER_BYTES)
    _ENCODER.encode_into(message, buf, FRAME_HEADER_BYTES)
    length = len(buf) - FRAME_HEADER_BYTES
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"message of {length} bytes exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
    buf[:FRAME_HEADER_BYTES] = length.to_bytes(FRAME_HEADER_BYTES, "big")
    return bytes(buf)


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """Payload length announced by a frame header; raises FrameError if over the limit."""
    length = int.from_bytes(header[:FRAME_HEADER_BYTES], "big")
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
    return length


def decode_request(payload: bytes) -> Request:
    try:
        return _REQUEST_DECODER.decode(payload)
    # ValidationError is a DecodeError; a str field of invalid UTF-8 raises
    # UnicodeDecodeError (a ValueError) instead: every one is a bad frame, never a crash.
    except (msgspec.DecodeError, ValueError) as exc:
        raise FrameError(f"undecodable request: {exc}") from exc


def decode_reply(payload: bytes) -> Reply:
    try:
        return _REPLY_DECODER.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise FrameError(f"undecodable reply: {exc}") from exc


class FrameDecoder:
    """Reassembles frames from a byte stream read in arbitrary pieces (non-blocking reads)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the payloads of all frames now complete, in order."""
        buf = self._buf
        buf += data
        payloads: list[bytes] = []
        start = 0
        while len(buf) - start >= FRAME_HEADER_BYTES:
            length = frame_length(buf[start : start + FRAME_HEADER_BYTES])
            end = start + FRAME_HEADER_BYTES + length
            if len(buf) < end:
                break
            payloads.append(bytes(buf[start + FRAME_HEADER_BYTES : end]))
            start = end
        if start:
            del buf[:start]
        return payloads
