"""Converts call audio between µ-law 8 kHz and the PCM16 16 kHz some agents want."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

SAMPLE_RATE_8K_HZ = 8000
SAMPLE_RATE_16K_HZ = 16000
PCM16_SAMPLE_BYTES = 2

# ITU-T G.711 µ-law constants.
ULAW_BIAS = 0x84
ULAW_CLIP = 32635

# One low-pass filter at 16 kHz serves both directions: it removes the images
# that doubling the rate creates, and the content that halving it would fold
# back. The cutoff (-6 dB) sits below 4 kHz so that what folds onto the
# telephone band (4.6 kHz and up) is at least 74 dB down, and everything from
# 4.1 kHz at least 64 dB. The passband is within 0.2 dB up to 3.4 kHz.
FILTER_TAPS = 81
FILTER_CUTOFF_HZ = 3700.0
# Kaiser's rule, beta = 0.1102 * (A - 8.7), for A = 65 dB of stopband.
FILTER_KAISER_BETA = 6.2
# Linear phase: every frequency is late by half the span, 40 samples (2.5 ms).
FILTER_DELAY_16K_SAMPLES = (FILTER_TAPS - 1) // 2

_INT16_MIN = -32768
_INT16_MAX = 32767
_PCM16 = np.dtype("<i2")
_PCM16_UNSIGNED = np.dtype("<u2")

_Samples = NDArray[np.float64]


def _build_decode_table() -> NDArray[np.int16]:
    codes = np.arange(256, dtype=np.int32)
    inverted = ~codes & 0xFF
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS
    signed = np.where(inverted & 0x80, -magnitude, magnitude)
    return signed.astype(_PCM16)


def _build_encode_table() -> NDArray[np.uint8]:
    # Indexed by a sample's 16 bits read as unsigned, so a frame's buffer viewed
    # as uint16 indexes it without arithmetic.
    wide = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    sign = np.where(wide < 0, 0x80, 0)
    biased = np.minimum(np.abs(wide), ULAW_CLIP) + ULAW_BIAS
    # biased lies in [132, 32767]: frexp's exponent is its bit length (8..15),
    # which picks the segment 0..7.
    _, bit_length = np.frexp(biased)
    exponent = bit_length - 8
    mantissa = (biased >> (exponent + 3)) & 0x0F
    code = ~(sign | (exponent << 4) | mantissa) & 0xFF
    table: NDArray[np.uint8] = code.astype(np.uint8)
    return table


_ULAW_DECODE = _build_decode_table()
_ULAW_DECODE_FLOAT = _ULAW_DECODE.astype(np.float64)
_ULAW_ENCODE = _build_encode_table()


def ulaw_to_pcm16(data: bytes) -> bytes:
    """Decode µ-law bytes to PCM16 LE, two bytes per input byte (±32124 at most)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    return _ULAW_DECODE[codes].tobytes()


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Encode PCM16 LE to µ-law, one byte per two input bytes."""
    _check_pcm16(data)
    return _ULAW_ENCODE[np.frombuffer(data, dtype=_PCM16_UNSIGNED)].tobytes()


def _check_pcm16(data: bytes) -> None:
    if len(data) % PCM16_SAMPLE_BYTES:
        raise ValueError(f"pcm16 needs an even byte count, got {len(data)} bytes")


def _pcm16_samples(data: bytes) -> _Samples:
    _check_pcm16(data)
    return np.frombuffer(data, dtype=_PCM16).astype(np.float64)


def _rounded_pcm16(samples: _Samples) -> NDArray[np.int16]:
    """Round and clip ``samples`` in place, then convert them to PCM16 LE."""
    np.rint(samples, out=samples)
    samples.clip(_INT16_MIN, _INT16_MAX, out=samples)
    return samples.astype(_PCM16)


def _pcm16_bytes(samples: _Samples) -> bytes:
    return _rounded_pcm16(samples).tobytes()


def _ulaw_bytes(samples: _Samples) -> bytes:
    return _ULAW_ENCODE[_rounded_pcm16(samples).view(_PCM16_UNSIGNED)].tobytes()


def _design_lowpass(
    taps: int, cutoff_hz: float, sample_rate_hz: int, kaiser_beta: float
) -> _Samples:
    """Kaiser-windowed sinc with unity gain at 0 Hz; ``taps`` odd (symmetric)."""
    offsets = np.arange(taps) - (taps - 1) / 2
    cycles_per_sample = 2.0 * cutoff_hz / sample_rate_hz
    ideal = cycles_per_sample * np.sinc(cycles_per_sample * offsets)
    shaped = ideal * np.kaiser(taps, kaiser_beta)
    normalised: _Samples = shaped / shaped.sum()
    return normalised


_LOWPASS = _design_lowpass(
    FILTER_TAPS, FILTER_CUTOFF_HZ, SAMPLE_RATE_16K_HZ, FILTER_KAISER_BETA
)
# np.correlate with reversed taps is a convolution, without np.convolve
# reversing them again on every call.
_LOWPASS_REVERSED = _LOWPASS[::-1].copy()
# Inserting a zero after every sample halves the level; doubling the taps
# restores it.
_UPSAMPLING_TAPS_REVERSED = 2.0 * _LOWPASS_REVERSED


class Upsampler:
    """Doubles PCM16 from 8 kHz to 16 kHz for one direction of one call.

    Each call to :meth:`process` returns exactly twice as many samples as it
    was given. The last input samples are kept between calls, so a signal cut
    into frames comes out as if filtered in one piece.
    """

    delay_samples: ClassVar[int] = FILTER_DELAY_16K_SAMPLES
    """Group delay in output samples at 16 kHz (40 samples, 2.5 ms)."""

    def __init__(self) -> None:
        # The newest 80 samples of the input at 16 kHz, zeros inserted.
        self._history = np.zeros(FILTER_TAPS - 1)

    def process(self, pcm: bytes) -> bytes:
        """Return PCM16 LE at 16 kHz, twice the bytes of ``pcm`` (PCM16 LE, 8 kHz)."""
        return _pcm16_bytes(self._resample(_pcm16_samples(pcm)))

    def reset(self) -> None:
        """Forget the filter history, as at the start of a call."""
        self._history.fill(0.0)

    def _resample(self, samples: _Samples) -> _Samples:
        if samples.size == 0:
            return samples
        # Half the products are with inserted zeros; a polyphase split would
        # skip them, but measured slower: numpy's cost here is per call, not
        # per multiply.
        stuffed = np.zeros(self._history.size + 2 * samples.size)
        stuffed[: self._history.size] = self._history
        stuffed[self._history.size :: 2] = samples
        self._history = stuffed[-self._history.size :].copy()
        output: _Samples = np.correlate(stuffed, _UPSAMPLING_TAPS_REVERSED, "valid")
        return output


class Downsampler:
    """Halves PCM16 from 16 kHz to 8 kHz for one direction of one call.

    Each call to :meth:`process` takes an even number of samples and returns
    exactly half as many. Input content above 4 kHz is filtered out before it
    can fold back into the telephone band.
    """

    delay_samples: ClassVar[int] = FILTER_DELAY_16K_SAMPLES // 2
    """Group delay in output samples at 8 kHz (20 samples, 2.5 ms)."""

    def __init__(self) -> None:
        self._history = np.zeros(_LOWPASS.size - 1)

    def process(self, pcm: bytes) -> bytes:
        """Return PCM16 LE at 8 kHz, half the bytes of ``pcm`` (PCM16 LE, 16 kHz)."""
        return _pcm16_bytes(self._resample(_pcm16_samples(pcm)))

    def reset(self) -> None:
        """Forget the filter history, as at the start of a call."""
        self._history.fill(0.0)

    def _resample(self, samples: _Samples) -> _Samples:
        if samples.size % 2:
            raise ValueError(
                f"downsampling needs an even sample count, got {samples.size}"
            )
        if samples.size == 0:
            return samples
        padded = np.concatenate((self._history, samples))
        self._history = padded[samples.size :].copy()
        # Output m is the filtered value at input 2m; filtering the odd
        # positions too costs less in numpy than a polyphase split would save.
        filtered = np.correlate(padded, _LOWPASS_REVERSED, "valid")
        output: _Samples = filtered[0::2]
        return output


class CallerToAgentPcm16:
    """The caller's µ-law 8 kHz frames as PCM16 LE 16 kHz, for one call."""

    delay_samples: ClassVar[int] = Upsampler.delay_samples
    """Group delay in output samples at 16 kHz."""

    def __init__(self) -> None:
        self._upsampler = Upsampler()

    def process(self, frame: bytes) -> bytes:
        """Return PCM16 LE at 16 kHz, four bytes per µ-law byte of ``frame``."""
        codes = np.frombuffer(frame, dtype=np.uint8)
        return _pcm16_bytes(self._upsampler._resample(_ULAW_DECODE_FLOAT[codes]))

    def reset(self) -> None:
        """Forget the filter history, as at the start of a call."""
        self._upsampler.reset()


class AgentPcm16ToCaller:
    """An agent's PCM16 LE 16 kHz audio as µ-law 8 kHz, for one call.

    Platforms cut audio anywhere, so a frame may hold an odd number of samples;
    the odd one out is held until the next frame. Frames with an even sample
    count give exactly half as many µ-law bytes.
    """

    delay_samples: ClassVar[int] = Downsampler.delay_samples
    """Group delay in output samples at 8 kHz."""

    def __init__(self) -> None:
        self._downsampler = Downsampler()
        self._held = np.empty(0)

    def process(self, frame: bytes) -> bytes:
        """Return µ-law at 8 kHz, one byte per two samples of ``frame`` (16 kHz)."""
        samples = _pcm16_samples(frame)
        if self._held.size:
            samples = np.concatenate((self._held, samples))
        usable = samples.size - samples.size % 2
        self._held = samples[usable:].copy()
        return _ulaw_bytes(self._downsampler._resample(samples[:usable]))

    def reset(self) -> None:
        """Forget the filter history and any held sample."""
        self._downsampler.reset()
        self._held = np.empty(0)
