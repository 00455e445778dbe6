"""G.711 µ-law audio for the peers, so tests can speak and check Twilio's codec."""

import math
from collections.abc import Sequence

__all__ = [
    "FRAME_BYTES",
    "MULAW_SILENCE",
    "SAMPLE_RATE_HZ",
    "mulaw_decode",
    "mulaw_encode",
    "silence_mulaw",
    "split_frames",
    "tone_mulaw",
]

SAMPLE_RATE_HZ = 8000
FRAME_BYTES = 160
# Encodes linear 0; Twilio and vocode both pad with it.
MULAW_SILENCE = 0xFF

_BIAS = 0x84
_CLIP = 32635
_INT16_MIN = -32768
_INT16_MAX = 32767


def _encode_sample(sample: int) -> int:
    sign = 0
    if sample < 0:
        sign = 0x80
        sample = -sample
    biased = min(sample, _CLIP) + _BIAS
    # biased lies in [132, 32767], so its top set bit picks segment 0..7.
    exponent = biased.bit_length() - 8
    mantissa = (biased >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _decode_byte(code: int) -> int:
    inverted = ~code & 0xFF
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return -magnitude if inverted & 0x80 else magnitude


_DECODE_TABLE = tuple(_decode_byte(code) for code in range(256))


def mulaw_encode(samples: Sequence[int]) -> bytes:
    """Encode 16-bit signed linear samples (-32768..32767), one byte per sample."""
    for sample in samples:
        if not _INT16_MIN <= sample <= _INT16_MAX:
            raise ValueError(f"sample {sample} is outside the 16-bit range")
    return bytes(_encode_sample(sample) for sample in samples)


def mulaw_decode(data: bytes) -> list[int]:
    """Decode µ-law bytes to 16-bit signed linear samples (magnitude ≤ 32124)."""
    return [_DECODE_TABLE[code] for code in data]


def tone_mulaw(
    freq_hz: float,
    duration_ms: int,
    amplitude: float = 0.5,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
) -> bytes:
    """Return a sine tone; amplitude is a fraction (0..1) of 16-bit full scale."""
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude {amplitude} is outside 0..1")
    if duration_ms < 0 or sample_rate_hz <= 0:
        raise ValueError("duration_ms must be ≥ 0 and sample_rate_hz > 0")
    count = sample_rate_hz * duration_ms // 1000
    peak = amplitude * _INT16_MAX
    step = 2.0 * math.pi * freq_hz / sample_rate_hz
    return mulaw_encode([round(peak * math.sin(step * n)) for n in range(count)])


def silence_mulaw(duration_ms: int, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """Return µ-law silence lasting duration_ms."""
    return bytes([MULAW_SILENCE]) * (sample_rate_hz * duration_ms // 1000)


def split_frames(data: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """Cut audio into frames (160 bytes = 20 ms at 8 kHz).

    The last frame is padded with µ-law silence: Twilio never sends a short frame,
    so neither do the peers.
    """
    if frame_bytes <= 0:
        raise ValueError("frame_bytes must be positive")
    frames = [data[i : i + frame_bytes] for i in range(0, len(data), frame_bytes)]
    if frames and len(frames[-1]) < frame_bytes:
        padding = bytes([MULAW_SILENCE]) * (frame_bytes - len(frames[-1]))
        frames[-1] += padding
    return frames
