"""A real conversation through the bridge: barge-in, keypad, transfer, failure."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import redis.asyncio as redis

from media.codecs import Downsampler, Upsampler, ulaw_to_pcm16
from tests.harness import Harness, running_callgate
from tests.peers.audio import split_frames, tone_mulaw

NUMBER = "+15005550001"
CALLER = "+14155551212"
TRANSFER_TO = "+15005550777"


async def test_barge_in_clears_twilio_within_a_frame(callgate: Harness) -> None:
    """The agent's interrupt reaches Twilio as clear within 20 ms; old audio goes."""
    tenant = await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    speech = tone_mulaw(440, duration_ms=3000)
    await callgate.vapi.send_audio(vapi_call.id, split_frames(speech))
    await call.wait_for_audio(len(speech), timeout_secs=5)
    assert call.queued_playback_secs() > 2.0

    loop = asyncio.get_running_loop()
    interrupted_at = loop.time()
    await callgate.vapi.send_json(vapi_call.id, {"type": "user-interrupted"})
    await call.wait_for_event("clear", timeout_secs=2)
    assert call.clears_received[0] - interrupted_at < 0.020
    assert call.queued_playback_secs() == 0

    answer = tone_mulaw(1000, duration_ms=200)
    await callgate.vapi.send_audio(vapi_call.id, split_frames(answer))
    await call.wait_for_audio(len(speech) + len(answer), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()

    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["interruptions"] == 1
    assert record["agent_audio_ms"] == 3200
    assert record["agent_played_ms"] < 3000
    assert callgate.metric("callgate_barge_ins_total", {}) == 1


async def test_keypad_digits_reach_the_agent(callgate: Harness) -> None:
    """A DTMF digit reaches Vapi as a user message naming the key."""
    await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    await call.send_dtmf("5")
    await call.send_dtmf("#")
    await call.hang_up()
    await vapi_call.wait_closed(timeout_secs=5)
    added = [m for m in vapi_call.received_text if m.get("type") == "add-message"]
    assert [m["message"] for m in added] == [
        {"role": "user", "content": "[keypad] 5"},
        {"role": "user", "content": "[keypad] #"},
    ]
    assert all(m["triggerResponseEnabled"] is True for m in added)


async def test_agent_transfer_redirects_the_call(callgate: Harness) -> None:
    """A transfer to an allowed number redirects the live call with <Dial>."""
    tenant = await callgate.tenant("alpha", NUMBER)
    await callgate.set_policy(tenant.workspace_id, transfer_numbers=[TRANSFER_TO])
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    await callgate.vapi.send_json(
        vapi_call.id,
        {
            "type": "transfer-update",
            "destination": {"type": "number", "number": TRANSFER_TO},
        },
    )
    await call.wait_closed(timeout_secs=5)
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()
    assert call.redirected_twiml is not None
    assert f"<Dial>{TRANSFER_TO}</Dial>" in call.redirected_twiml
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "transferred"
    assert record["transferred_to"] == TRANSFER_TO
    assert callgate.metric("callgate_transfers_total", {"outcome": "done"}) == 1


async def test_transfer_to_a_number_not_allowed_is_refused(callgate: Harness) -> None:
    """A transfer to a number off the workspace's list changes nothing."""
    tenant = await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    await callgate.vapi.send_json(
        vapi_call.id,
        {
            "type": "transfer-update",
            "destination": {"type": "number", "number": TRANSFER_TO},
        },
    )
    tone = tone_mulaw(440, duration_ms=200)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)  # still bridged
    await call.hang_up()
    await callgate.calls_settled()
    assert callgate.rest_forms(call.sid) == []
    assert callgate.metric("callgate_transfers_total", {"outcome": "refused"}) == 1
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "caller_hung_up"


async def test_agent_platform_refusing_plays_the_fallback_fast(
    callgate: Harness,
) -> None:
    """Vapi answering 500 sends the caller to the fallback message within 2 s."""
    tenant = await callgate.tenant("alpha", NUMBER)
    callgate.vapi.create_status_override = 500
    call = await callgate.place(NUMBER, CALLER)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await call.open_stream()
    await call.wait_closed(timeout_secs=5)
    assert loop.time() - started < 2.0
    assert call.redirected_twiml is not None
    assert "<Say>Sorry, we can't take your call right now" in call.redirected_twiml
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"
    assert callgate.metric("callgate_fallbacks_total", {"outcome": "done"}) == 1


async def test_agent_platform_timing_out_dials_the_fallback_number(
    store: redis.Redis, valkey_url: str, tmp_path: Path
) -> None:
    """A Vapi that does not answer in time sends the caller to the fallback number."""
    async with running_callgate(
        valkey_url, tmp_path, CALLGATE_UPSTREAM_TIMEOUT_MS="500"
    ) as callgate:
        tenant = await callgate.tenant("alpha", NUMBER)
        await callgate.set_policy(tenant.workspace_id, fallback_number=TRANSFER_TO)
        callgate.vapi.create_delay_secs = 5.0
        call = await callgate.place(NUMBER, CALLER)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await call.open_stream()
        await call.wait_closed(timeout_secs=5)
        assert loop.time() - started < 2.5  # 0.5 s timeout, then under 2 s
        assert call.redirected_twiml is not None
        assert f"<Dial>{TRANSFER_TO}</Dial>" in call.redirected_twiml
        await callgate.calls_settled()
        record = await callgate.call_record(tenant.workspace_id, call.sid)
        assert record["end_reason"] == "upstream_failed"


async def test_agent_platform_dying_mid_call_plays_the_fallback(
    callgate: Harness,
) -> None:
    """A Vapi socket reset mid-call: fallback heard, reason and seconds recorded."""
    tenant = await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    tone = tone_mulaw(440, duration_ms=600)
    await call.send_audio(split_frames(tone))
    await callgate.vapi.drop(vapi_call.id)
    await call.wait_closed(timeout_secs=5)
    assert call.redirected_twiml is not None
    assert "<Say>" in call.redirected_twiml
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["end_reason"] == "upstream_failed"
    assert 550 <= record["metered_ms"] <= 2000
    assert (
        callgate.metric(
            "callgate_calls_ended_total",
            {"workspace": tenant.workspace_id, "reason": "upstream_failed"},
        )
        == 1
    )


async def test_lost_stream_hangs_the_call_up_through_twilio(callgate: Harness) -> None:
    """When the stream drops without a stop, Callgate ends the call via REST."""
    await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    await call.drop()
    await vapi_call.wait_closed(timeout_secs=5)
    await callgate.calls_settled()
    assert {"Status": "completed"} in [dict(f) for f in callgate.rest_forms(call.sid)]


async def test_agents_last_words_play_before_the_call_ends(callgate: Harness) -> None:
    """After the agent hangs up, its queued goodbye plays before Twilio is closed."""
    await callgate.tenant("alpha", NUMBER)
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    goodbye = tone_mulaw(440, duration_ms=1000)
    await callgate.vapi.send_audio(vapi_call.id, split_frames(goodbye))
    loop = asyncio.get_running_loop()
    hung_up_at = loop.time()
    await callgate.vapi.hang_up(vapi_call.id)
    await call.wait_closed(timeout_secs=5)
    assert len(call.received_audio) == len(goodbye)
    assert call.queued_playback_secs() == 0
    assert loop.time() - hung_up_at >= 0.8
    assert call.ended_by_server


def _snr_db(reference: bytes, received: bytes, delay_samples: int) -> float:
    """SNR of ``received`` µ-law against ``reference``, after ``delay_samples``."""
    ref = np.frombuffer(ulaw_to_pcm16(reference), dtype="<i2").astype(np.float64)
    got = np.frombuffer(ulaw_to_pcm16(received), dtype="<i2").astype(np.float64)
    warm_up = 160  # skip the filters' first 20 ms
    ref = ref[warm_up : len(ref) - delay_samples]
    got = got[warm_up + delay_samples : warm_up + delay_samples + len(ref)]
    noise = float(np.sum((got - ref) ** 2)) or 1e-9
    return 10 * float(np.log10(float(np.sum(ref**2)) / noise))


async def test_pcm16_agent_gets_linear_audio_and_the_caller_hears_it_clearly(
    callgate: Harness,
) -> None:
    """A PCM16 agent receives 16 kHz linear audio; the round trip keeps 30 dB SNR."""
    await callgate.tenant("alpha", NUMBER, audio_format="pcm16")
    call, vapi_call = await callgate.connected_call(NUMBER, CALLER)
    assert vapi_call.audio_format == {
        "format": "pcm_s16le",
        "container": "raw",
        "sampleRate": 16000,
    }
    tone = tone_mulaw(440, duration_ms=1000)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()

    assert len(vapi_call.received_audio) == 4 * len(tone)
    round_trip_delay = Upsampler.delay_samples // 2 + Downsampler.delay_samples
    assert _snr_db(tone, bytes(call.received_audio), round_trip_delay) >= 30


async def test_recording_is_stereo_and_listed_on_the_call(callgate: Harness) -> None:
    """With recording on, the call leaves a stereo WAV in its workspace's folder."""
    tenant = await callgate.tenant("alpha", NUMBER)
    await callgate.set_policy(tenant.workspace_id, recording=True)
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    tone = tone_mulaw(440, duration_ms=1000)
    await call.send_audio(split_frames(tone))
    await call.wait_for_audio(len(tone), timeout_secs=5)
    await call.hang_up()
    await callgate.calls_settled()

    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["recording"] == f"recordings/{call.sid}.wav"
    path = (callgate.settings.data_dir / "workspaces" / tenant.workspace_id) / record[
        "recording"
    ]
    left, right = _stereo(path)
    assert np.array_equal(left[: len(tone)], _pcm(tone))
    # The agent's echo is on the right channel, a little behind the caller:
    # its first 20 ms start within 200 ms of the caller's and match exactly.
    echo = _pcm(tone)
    starts = [
        offset
        for offset in range(1600)
        if np.array_equal(right[offset : offset + 160], echo[:160])
    ]
    assert starts, "the agent's audio is not on the right channel"
    assert np.count_nonzero(right) >= 0.9 * np.count_nonzero(echo)


async def test_calls_are_not_recorded_unless_the_workspace_asks(
    callgate: Harness,
) -> None:
    """Recording is off by default: no file, nothing on the record."""
    tenant = await callgate.tenant("alpha", NUMBER)
    call, _ = await callgate.connected_call(NUMBER, CALLER)
    await call.hang_up()
    await callgate.calls_settled()
    record = await callgate.call_record(tenant.workspace_id, call.sid)
    assert record["recording"] is None
    assert not _exists(callgate.settings.data_dir / "workspaces")


def _exists(path: Path) -> bool:
    return path.exists()


def _stereo(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as recording:
        assert recording.getnchannels() == 2
        data = recording.readframes(recording.getnframes())
    frames = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def _pcm(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(ulaw_to_pcm16(ulaw), dtype="<i2")


async def test_a_stalled_caller_drops_stale_audio_and_stalls_no_one_else(
    callgate: Harness,
) -> None:
    """A caller leg that stops reading loses old agent audio; other calls go on."""
    await callgate.tenant("alpha", NUMBER)
    await callgate.tenant("bravo", "+15005550002")
    stalled, stalled_agent = await callgate.connected_call(NUMBER, CALLER)
    stalled.pause_reading()
    # Twenty minutes of agent speech in one-second chunks, far more than the
    # socket buffers between Callgate and the stalled caller can hold.
    burst = [tone_mulaw(440, duration_ms=1000)] * 1200
    await callgate.vapi.send_audio(stalled_agent.id, burst)

    other, _ = await callgate.connected_call("+15005550002", CALLER)
    tone = tone_mulaw(1000, duration_ms=1000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await other.send_audio(split_frames(tone))
    await other.wait_for_audio(len(tone), timeout_secs=5)
    assert bytes(other.received_audio) == tone
    assert loop.time() - started < 1.5

    dropped = callgate.metric(
        "callgate_frames_dropped_total", {"direction": "agent_to_caller"}
    )
    assert dropped is not None
    assert dropped > 0
    stalled.resume_reading()
    await stalled.hang_up()
    await other.hang_up()
    await callgate.calls_settled()
    assert len(stalled.received_audio) < sum(len(chunk) for chunk in burst)
