"""Call recordings: a stereo WAV per call, caller on the left, agent on the right.

The timeline is the caller's: Twilio delivers caller audio in real time, so the
caller track grows at 8000 samples a second and its length is "now". Agent
audio plays after whatever is already queued, never before now, and a barge-in
cuts the queued part off, as Twilio's ``clear`` does. Both tracks are written
as 16-bit PCM to files beside the recording while the call runs (an unwritten
stretch of the agent's file reads back as silence), and joined into the WAV
at the end, so a long call costs disk, not memory.
"""

from __future__ import annotations

import asyncio
import os
import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np

from media.codecs import PCM16_SAMPLE_BYTES, SAMPLE_RATE_8K_HZ, ulaw_to_pcm16

_CHUNK_SAMPLES = SAMPLE_RATE_8K_HZ * 10


class Recorder:
    """Records one call to ``path`` (a ``.wav``); owned by the call's bridge."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._caller_path = path.with_suffix(".caller.pcm")
        self._agent_path = path.with_suffix(".agent.pcm")
        self._caller: BinaryIO = self._caller_path.open("wb")
        self._agent: BinaryIO = self._agent_path.open("wb")
        self._caller_samples = 0
        self._agent_cursor = 0
        self._agent_end = 0

    def caller(self, payload: bytes) -> None:
        """Caller audio (µ-law) as it arrives; it moves the timeline on."""
        self._caller.write(ulaw_to_pcm16(payload))
        self._caller_samples += len(payload)

    def agent(self, payload: bytes) -> None:
        """Agent audio (µ-law) as it is sent to Twilio, played after the queue."""
        start = max(self._agent_cursor, self._caller_samples)
        self._agent.seek(start * PCM16_SAMPLE_BYTES)
        self._agent.write(ulaw_to_pcm16(payload))
        self._agent_cursor = start + len(payload)
        self._agent_end = max(self._agent_end, self._agent_cursor)

    def clear(self) -> None:
        """Barge-in: agent audio queued past now was never heard."""
        if self._agent_cursor > self._caller_samples:
            self._agent_cursor = self._caller_samples
            self._agent_end = self._caller_samples
            self._agent.truncate(self._caller_samples * PCM16_SAMPLE_BYTES)

    async def close(self) -> Path:
        """Write the stereo WAV and remove the track files; return its path."""
        self._caller.close()
        self._agent.close()
        length = max(self._caller_samples, self._agent_end)
        await asyncio.to_thread(self._join, length)
        return self.path

    def _join(self, length: int) -> None:
        with (
            self._caller_path.open("rb") as caller,
            self._agent_path.open("rb") as agent,
            wave.open(str(self.path), "wb") as output,
        ):
            output.setnchannels(2)
            output.setsampwidth(PCM16_SAMPLE_BYTES)
            output.setframerate(SAMPLE_RATE_8K_HZ)
            for start in range(0, length, _CHUNK_SAMPLES):
                count = min(_CHUNK_SAMPLES, length - start)
                frames = np.zeros((count, 2), dtype="<i2")
                for channel, track in enumerate((caller, agent)):
                    data = track.read(count * PCM16_SAMPLE_BYTES)
                    samples = np.frombuffer(data, dtype="<i2")
                    frames[: len(samples), channel] = samples
                output.writeframes(frames.tobytes())
        os.unlink(self._caller_path)
        os.unlink(self._agent_path)
