"""Tests for the Twilio Media Streams parser, serializers and stream state."""

from __future__ import annotations

import base64

import orjson
import pytest

from media import frames

STREAM = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "c" * 32


def _start(sequence: int = 1, stream: str = STREAM) -> str:
    return orjson.dumps(
        {
            "event": "start",
            "sequenceNumber": str(sequence),
            "start": {
                "accountSid": ACCOUNT,
                "streamSid": stream,
                "callSid": CALL,
                "tracks": ["inbound"],
                "customParameters": {"workspace": "ws_x"},
                "mediaFormat": {
                    "encoding": "audio/x-mulaw",
                    "sampleRate": 8000,
                    "channels": 1,
                },
            },
            "streamSid": stream,
        }
    ).decode()


def _media(sequence: int, payload: bytes, stream: str = STREAM) -> str:
    return orjson.dumps(
        {
            "event": "media",
            "sequenceNumber": str(sequence),
            "media": {
                "track": "inbound",
                "chunk": str(sequence - 1),
                "timestamp": str((sequence - 2) * 20),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": stream,
        }
    ).decode()


CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'


def test_parse_start_reads_every_field() -> None:
    """A start message yields the stream, call, account and media format."""
    event = frames.parse(_start())
    assert isinstance(event, frames.Start)
    assert event.stream_sid == STREAM
    assert event.call_sid == CALL
    assert event.account_sid == ACCOUNT
    assert event.custom_parameters == {"workspace": "ws_x"}
    assert (event.encoding, event.sample_rate_hz, event.channels) == (
        "audio/x-mulaw",
        8000,
        1,
    )


def test_parse_media_decodes_the_payload() -> None:
    """A media message carries its µ-law bytes decoded from base64."""
    payload = bytes(range(160))
    event = frames.parse(_media(3, payload))
    assert isinstance(event, frames.Media)
    assert event.payload == payload
    assert (event.sequence, event.chunk, event.timestamp_ms) == (3, 2, 20)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"event": 5}', "no event name"),
        ('{"event":"media","sequenceNumber":"2","streamSid":"MZ1"}', "media must"),
        (_media(2, b"x").replace('"2"', '"two"', 1), "sequenceNumber"),
        (_media(2, b"abc").replace("YWJj", "Y!!j"), "not base64"),
        (
            orjson.dumps(
                {
                    "event": "dtmf",
                    "sequenceNumber": "2",
                    "streamSid": STREAM,
                    "dtmf": {"digit": "12"},
                }
            ).decode(),
            "keypad",
        ),
    ],
)
def test_parse_rejects_malformed_frames(frame: str, message: str) -> None:
    """Malformed frames raise a named error with a close code, never KeyError."""
    with pytest.raises(frames.StreamFrameError, match=message) as caught:
        frames.parse(frame)
    assert caught.value.close_code in {
        frames.CLOSE_INVALID_PAYLOAD,
        frames.CLOSE_POLICY_VIOLATION,
    }


def test_parse_skips_unknown_event_types() -> None:
    """An event type Twilio may add later is ignored, not fatal."""
    assert frames.parse('{"event":"future-thing","sequenceNumber":"9"}') is None


def test_parse_refuses_oversized_frames() -> None:
    """A frame over 64 KiB is refused before it is decoded."""
    with pytest.raises(frames.StreamFrameError, match="too large"):
        frames.parse('{"event":"media","x":"' + "a" * 70_000 + '"}')


def test_media_frame_round_trips_through_the_parser_format() -> None:
    """Outbound media is valid JSON carrying the payload in base64."""
    payload = b"\x00\xff" * 80
    message = orjson.loads(frames.media_frame(STREAM, payload))
    assert message == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": base64.b64encode(payload).decode()},
    }


def test_mark_and_clear_frames_match_twilio_shapes() -> None:
    """Outbound mark and clear messages have the documented shape."""
    assert orjson.loads(frames.mark_frame(STREAM, "utt-1")) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": "utt-1"},
    }
    assert orjson.loads(frames.clear_frame(STREAM)) == {
        "event": "clear",
        "streamSid": STREAM,
    }


def test_stream_state_accepts_a_normal_lifecycle() -> None:
    """connected, start, media and stop in order are accepted."""
    state = frames.StreamState()
    assert isinstance(state.receive(CONNECTED), frames.Connected)
    assert isinstance(state.receive(_start()), frames.Start)
    assert isinstance(state.receive(_media(2, b"\xff" * 160)), frames.Media)
    stop = orjson.dumps(
        {
            "event": "stop",
            "sequenceNumber": "3",
            "stop": {"accountSid": ACCOUNT, "callSid": CALL},
            "streamSid": STREAM,
        }
    )
    assert isinstance(state.receive(stop), frames.Stop)
    assert state.phase is frames.Phase.STOPPED
    assert state.sequence_gaps == 0


def test_stream_state_refuses_media_before_start() -> None:
    """Media before start violates the protocol."""
    state = frames.StreamState()
    state.receive(CONNECTED)
    with pytest.raises(frames.StreamFrameError, match="unexpected media") as caught:
        state.receive(_media(2, b"\xff"))
    assert caught.value.close_code == frames.CLOSE_POLICY_VIOLATION


def test_stream_state_refuses_another_streams_messages() -> None:
    """A message naming a different stream id is refused."""
    state = frames.StreamState()
    state.receive(CONNECTED)
    state.receive(_start())
    with pytest.raises(frames.StreamFrameError, match="another stream"):
        state.receive(_media(2, b"\xff", stream="MZ" + "d" * 32))


def test_stream_state_counts_sequence_gaps() -> None:
    """A jump in sequence numbers is counted as lost messages."""
    state = frames.StreamState()
    state.receive(CONNECTED)
    state.receive(_start())
    state.receive(_media(2, b"\xff"))
    state.receive(_media(5, b"\xff"))
    assert state.sequence_gaps == 2
