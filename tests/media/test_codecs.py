"""Tests for the µ-law codec, the 8/16 kHz resamplers and the per-call chains."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from media.codecs import (
    SAMPLE_RATE_8K_HZ,
    SAMPLE_RATE_16K_HZ,
    AgentPcm16ToCaller,
    CallerToAgentPcm16,
    Downsampler,
    Upsampler,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from tests.peers import audio

FRAME_MS = 20
# Long enough for the filter's 81 taps at 16 kHz (5 ms) to fill with signal.
WARM_UP_MS = 20
NEGATIVE_ZERO = 0x7F
SILENCE = 0xFF

Processor = Upsampler | Downsampler | CallerToAgentPcm16 | AgentPcm16ToCaller


def _tone(freq_hz: float, sample_rate_hz: int, amplitude: float = 0.5) -> bytes:
    """One second of a sine as PCM16 LE; amplitude is a fraction of full scale."""
    times_s = np.arange(sample_rate_hz) / sample_rate_hz
    wave = amplitude * 32767 * np.sin(2 * np.pi * freq_hz * times_s)
    return np.rint(wave).astype("<i2").tobytes()


def _samples(pcm: bytes) -> NDArray[np.float64]:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def _split(data: bytes, size_bytes: int) -> list[bytes]:
    return [data[at : at + size_bytes] for at in range(0, len(data), size_bytes)]


def _frame_bytes(sample_rate_hz: int, sample_bytes: int) -> int:
    return sample_rate_hz * FRAME_MS // 1000 * sample_bytes


def _power(samples: NDArray[np.float64]) -> float:
    return float(np.mean(samples**2))


def _db_weaker(reference: NDArray[np.float64], other: NDArray[np.float64]) -> float:
    """How far the power of ``other`` lies below that of ``reference``, in dB."""
    power = _power(other)
    if power == 0:
        return math.inf
    return 10 * math.log10(_power(reference) / power)


def _round_trip(ulaw: bytes) -> bytes:
    """µ-law 8 kHz → PCM16 16 kHz → µ-law 8 kHz, in 20 ms frames."""
    to_agent = CallerToAgentPcm16()
    to_caller = AgentPcm16ToCaller()
    frame_bytes = _frame_bytes(SAMPLE_RATE_8K_HZ, 1)
    return b"".join(
        to_caller.process(to_agent.process(frame))
        for frame in _split(ulaw, frame_bytes)
    )


def test_ulaw_to_pcm16_decodes_known_values() -> None:
    """Both zero codes decode to 0 and the extreme codes to ±32124."""
    decoded = _samples(ulaw_to_pcm16(bytes([0xFF, 0x7F, 0x00, 0x80])))
    assert decoded.tolist() == [0, 0, -32124, 32124]


def test_pcm16_to_ulaw_encodes_known_values() -> None:
    """Zero encodes to 0xFF and samples past the clip level to the extreme codes."""
    samples = np.array([0, 32767, -32768, 32635, -32635], dtype="<i2")
    assert pcm16_to_ulaw(samples.tobytes()) == bytes([0xFF, 0x80, 0x00, 0x80, 0x00])


def test_pcm16_to_ulaw_restores_every_decoded_byte() -> None:
    """Every byte survives decode then encode, except negative zero, which is 0xFF."""
    codes = bytes(range(256))
    expected = codes.replace(bytes([NEGATIVE_ZERO]), bytes([SILENCE]))
    assert pcm16_to_ulaw(ulaw_to_pcm16(codes)) == expected


def test_pcm16_to_ulaw_matches_the_peer_encoder_for_every_sample() -> None:
    """The lookup table agrees with the peers' per-sample G.711 encoder."""
    samples = np.arange(-32768, 32768)
    encoded = pcm16_to_ulaw(samples.astype("<i2").tobytes())
    assert encoded == audio.mulaw_encode(samples.tolist())


def test_ulaw_to_pcm16_matches_the_peer_decoder_for_every_byte() -> None:
    """The lookup table agrees with the peers' per-byte G.711 decoder."""
    codes = bytes(range(256))
    assert _samples(ulaw_to_pcm16(codes)).tolist() == audio.mulaw_decode(codes)


def test_pcm16_to_ulaw_rejects_an_odd_byte_count() -> None:
    """Half a sample is refused with the byte count in the message."""
    with pytest.raises(ValueError, match="even byte count, got 3 bytes"):
        pcm16_to_ulaw(b"\x00\x01\x02")


@pytest.mark.parametrize("factory", [Upsampler, Downsampler, AgentPcm16ToCaller])
def test_pcm16_processors_reject_an_odd_byte_count(
    factory: Callable[[], Processor],
) -> None:
    """Every PCM16 input refuses half a sample."""
    with pytest.raises(ValueError, match="even byte count, got 641 bytes"):
        factory().process(bytes(641))


def test_downsampler_rejects_an_odd_sample_count() -> None:
    """The downsampler refuses a frame it cannot halve."""
    with pytest.raises(ValueError, match="even sample count, got 7"):
        Downsampler().process(bytes(14))


@pytest.mark.parametrize("count", [0, 1, 7, 160, 321])
def test_upsampler_returns_twice_the_samples(count: int) -> None:
    """Every frame gives exactly twice its samples, frame after frame."""
    upsampler = Upsampler()
    for _ in range(3):
        assert len(upsampler.process(bytes(2 * count))) == 4 * count


@pytest.mark.parametrize("count", [0, 2, 14, 320, 642])
def test_downsampler_returns_half_the_samples(count: int) -> None:
    """Every frame gives exactly half its samples, frame after frame."""
    downsampler = Downsampler()
    for _ in range(3):
        assert len(downsampler.process(bytes(2 * count))) == count


@pytest.mark.parametrize("count", [1, 7, 160])
def test_caller_to_agent_returns_four_bytes_per_ulaw_byte(count: int) -> None:
    """A µ-law frame comes out as twice as many PCM16 samples."""
    chain = CallerToAgentPcm16()
    for _ in range(3):
        assert len(chain.process(bytes([SILENCE]) * count)) == 4 * count


@pytest.mark.parametrize("size_bytes", [4, 28, 640, 1284])
def test_agent_to_caller_returns_one_byte_per_two_samples(size_bytes: int) -> None:
    """A PCM16 frame with an even sample count gives half as many µ-law bytes."""
    chain = AgentPcm16ToCaller()
    for _ in range(3):
        assert len(chain.process(bytes(size_bytes))) == size_bytes // 4


def test_agent_to_caller_holds_an_odd_sample_for_the_next_frame() -> None:
    """Frames of three samples give one and two bytes in turn, as one piece would."""
    pcm = _tone(440, SAMPLE_RATE_16K_HZ)[:1200]
    chain = AgentPcm16ToCaller()
    outputs = [chain.process(frame) for frame in _split(pcm, 6)]
    assert [len(output) for output in outputs[:4]] == [1, 2, 1, 2]
    assert b"".join(outputs) == AgentPcm16ToCaller().process(pcm)


@pytest.mark.parametrize(
    ("factory", "sample_rate_hz"),
    [(Upsampler, SAMPLE_RATE_8K_HZ), (Downsampler, SAMPLE_RATE_16K_HZ)],
)
def test_resamplers_stream_seamlessly(
    factory: Callable[[], Upsampler | Downsampler], sample_rate_hz: int
) -> None:
    """A second cut into 20 ms frames comes out within 1 LSB of one piece."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 4000, sample_rate_hz)
    signal = _samples(_tone(440, sample_rate_hz)) + noise
    pcm = np.clip(np.rint(signal), -32768, 32767).astype("<i2").tobytes()
    framed = factory()
    pieces = [
        framed.process(frame) for frame in _split(pcm, _frame_bytes(sample_rate_hz, 2))
    ]
    whole = factory().process(pcm)
    difference = _samples(b"".join(pieces)) - _samples(whole)
    assert np.max(np.abs(difference)) <= 1


def test_chains_stream_seamlessly() -> None:
    """The round trip in 20 ms frames equals the round trip in one piece."""
    ulaw = pcm16_to_ulaw(_tone(1004, SAMPLE_RATE_8K_HZ))
    whole = AgentPcm16ToCaller().process(CallerToAgentPcm16().process(ulaw))
    assert _round_trip(ulaw) == whole


def test_upsampler_delays_an_impulse_by_its_delay_samples() -> None:
    """An impulse at input sample 10 peaks at output sample 20 plus the delay."""
    impulse = np.zeros(160)
    impulse[10] = 10000
    output = _samples(Upsampler().process(impulse.astype("<i2").tobytes()))
    assert int(np.argmax(output)) == 20 + Upsampler.delay_samples


def test_downsampler_delays_an_impulse_by_its_delay_samples() -> None:
    """An impulse at input sample 20 peaks at output sample 10 plus the delay."""
    impulse = np.zeros(320)
    impulse[20] = 10000
    output = _samples(Downsampler().process(impulse.astype("<i2").tobytes()))
    assert int(np.argmax(output)) == 10 + Downsampler.delay_samples


@pytest.mark.parametrize(
    ("factory", "frame"),
    [
        (Upsampler, bytes(320)),
        (Downsampler, bytes(640)),
        (CallerToAgentPcm16, bytes([SILENCE]) * 160),
        (AgentPcm16ToCaller, bytes(642)),
    ],
)
def test_processors_reset_forgets_the_history(
    factory: Callable[[], Processor], frame: bytes
) -> None:
    """After reset a processor answers as a fresh one does."""
    rng = np.random.default_rng(3)
    processor = factory()
    processor.process(rng.integers(0, 256, len(frame), dtype=np.uint8).tobytes())
    processor.reset()
    assert processor.process(frame) == factory().process(frame)


# At 8 kHz a 1 kHz tone repeats every 8 samples and comes back bit-exact; 1004 Hz,
# the telephone test tone, does not divide the rate, so its samples cover the cycle.
@pytest.mark.parametrize("freq_hz", [440, 1000, 1004])
def test_round_trip_keeps_a_tone_above_30db_snr(freq_hz: int) -> None:
    """A tone through 16 kHz and back matches the µ-law original to 30 dB SNR."""
    ulaw = pcm16_to_ulaw(_tone(freq_hz, SAMPLE_RATE_8K_HZ))
    original = _samples(ulaw_to_pcm16(ulaw))
    returned = _samples(ulaw_to_pcm16(_round_trip(ulaw)))
    # The first delay is counted at 16 kHz.
    delay = CallerToAgentPcm16.delay_samples // 2 + AgentPcm16ToCaller.delay_samples
    skip = SAMPLE_RATE_8K_HZ * WARM_UP_MS // 1000
    aligned = returned[delay + skip :]
    reference = original[skip : original.size - delay]
    assert _db_weaker(reference, aligned - reference) >= 30


def test_caller_to_agent_keeps_a_1khz_tone_below_4khz() -> None:
    """At 16 kHz a 1 kHz tone peaks at 1 kHz; its image at 7 kHz is filtered out."""
    ulaw = pcm16_to_ulaw(_tone(1000, SAMPLE_RATE_8K_HZ))
    chain = CallerToAgentPcm16()
    frame_bytes = _frame_bytes(SAMPLE_RATE_8K_HZ, 1)
    pcm = b"".join(chain.process(frame) for frame in _split(ulaw, frame_bytes))
    skip = SAMPLE_RATE_16K_HZ * WARM_UP_MS // 1000
    steady = _samples(pcm)[skip:]
    spectrum = np.abs(np.fft.rfft(steady * np.hanning(steady.size))) ** 2
    freqs_hz = np.fft.rfftfreq(steady.size, 1 / SAMPLE_RATE_16K_HZ)
    above_4khz = spectrum[freqs_hz > 4000].sum() / spectrum.sum()
    image_7khz = spectrum[np.abs(freqs_hz - 7000) < 10].sum() / spectrum.max()
    assert abs(freqs_hz[np.argmax(spectrum)] - 1000) < 5
    assert 10 * np.log10(above_4khz) < -30
    assert 10 * np.log10(image_7khz) < -60


def test_downsampler_rejects_a_6khz_tone_by_30db() -> None:
    """A 6 kHz tone, which would fold to 2 kHz, comes out at least 30 dB weaker."""
    pcm = _tone(6000, SAMPLE_RATE_16K_HZ)
    downsampler = Downsampler()
    frame_bytes = _frame_bytes(SAMPLE_RATE_16K_HZ, 2)
    output = b"".join(downsampler.process(frame) for frame in _split(pcm, frame_bytes))
    skip = SAMPLE_RATE_8K_HZ * WARM_UP_MS // 1000
    assert _db_weaker(_samples(pcm), _samples(output)[skip:]) >= 30
