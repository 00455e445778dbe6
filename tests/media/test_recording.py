"""Tests for call recordings: a stereo WAV on the caller's timeline."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from media.codecs import ulaw_to_pcm16
from media.recording import Recorder
from tests.peers.audio import split_frames, tone_mulaw

FRAME = 160  # samples per 20 ms at 8 kHz


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as recording:
        assert (recording.getnchannels(), recording.getframerate()) == (2, 8000)
        assert recording.getsampwidth() == 2
        data = recording.readframes(recording.getnframes())
    frames = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _pcm(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(ulaw_to_pcm16(ulaw), dtype="<i2")


async def test_recording_puts_each_side_on_its_own_channel(tmp_path: Path) -> None:
    """The caller is on the left; the agent starts on the right when it spoke."""
    recorder = Recorder(tmp_path / "call.wav")
    caller = tone_mulaw(440, duration_ms=1000)
    agent = tone_mulaw(1000, duration_ms=400)
    frames = split_frames(caller)
    for frame in frames[:10]:
        recorder.caller(frame)
    recorder.agent(agent)
    for frame in frames[10:]:
        recorder.caller(frame)
    path = await recorder.close()

    left, right = _read(path)
    assert len(left) == 8000
    assert np.array_equal(left, _pcm(caller))
    assert not right[: 10 * FRAME].any()
    assert np.array_equal(right[10 * FRAME : 10 * FRAME + 3200], _pcm(agent))
    assert not right[10 * FRAME + 3200 :].any()
    assert _names(tmp_path) == ["call.wav"]


async def test_agent_audio_queues_behind_what_is_still_playing(
    tmp_path: Path,
) -> None:
    """Two agent chunks sent at once play one after the other."""
    recorder = Recorder(tmp_path / "call.wav")
    first = tone_mulaw(440, duration_ms=200)
    second = tone_mulaw(880, duration_ms=200)
    recorder.agent(first)
    recorder.agent(second)
    _, right = _read(await recorder.close())
    assert np.array_equal(right, np.concatenate([_pcm(first), _pcm(second)]))


async def test_barge_in_cuts_what_was_not_yet_heard(tmp_path: Path) -> None:
    """After a clear, agent audio queued past now is gone from the recording."""
    recorder = Recorder(tmp_path / "call.wav")
    long_answer = tone_mulaw(440, duration_ms=1000)
    recorder.agent(long_answer)
    for frame in split_frames(tone_mulaw(300, duration_ms=300)):
        recorder.caller(frame)
    recorder.clear()
    reply = tone_mulaw(1000, duration_ms=100)
    recorder.agent(reply)
    left, right = _read(await recorder.close())
    assert len(right) == 2400 + 800
    assert np.array_equal(right[:2400], _pcm(long_answer)[:2400])
    assert np.array_equal(right[2400:], _pcm(reply))
    assert len(left) == len(right)
