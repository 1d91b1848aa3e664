"""Frame encoding and the server's incremental decoder."""

from __future__ import annotations

import msgspec
import pytest

from kvmkt_connector.registry.framing import (
    FrameDecoder,
    FrameError,
    decode_reply,
    decode_request,
    encode_frame,
)
from kvmkt_connector.registry.protocol import (
    MAX_FRAME_BYTES,
    Hello,
    LeaseGranted,
    Publish,
    Sync,
)


def test_round_trip_and_header() -> None:
    hello = Hello(protocol_version=1, client="c", pid=42)
    frame = encode_frame(hello)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_request(frame[4:]) == hello
    grant = LeaseGranted(7, 1, "h", b"d", [1, 2], 99)
    assert decode_reply(encode_frame(grant)[4:]) == grant


def test_incremental_decoder_reassembles_any_split() -> None:
    messages = [Hello(1, "x", 1), Publish([b"k" * 16] * 3, [1, 2, 3]), Sync()]
    stream = b"".join(encode_frame(m) for m in messages)
    for piece in (1, 3, 7, len(stream)):
        decoder = FrameDecoder()
        payloads = []
        for start in range(0, len(stream), piece):
            payloads += decoder.feed(stream[start : start + piece])
        assert [decode_request(p) for p in payloads] == messages
        assert decoder.buffered_bytes == 0


def test_oversized_frames_are_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    too_big = Publish([b"k" * 16] * (MAX_FRAME_BYTES // 16), [0] * (MAX_FRAME_BYTES // 16))
    with pytest.raises(FrameError):
        encode_frame(too_big)


def test_undecodable_payloads() -> None:
    for payload in (b"", b"\xc1garbage", msgspec.msgpack.encode({"op": "frobnicate"})):
        with pytest.raises(FrameError):
            decode_request(payload)
    # A reply is not a request.
    with pytest.raises(FrameError):
        decode_request(encode_frame(LeaseGranted(1, 1, "h", b"", [], 0))[4:])
