-- Record what Twilio reported about a call in its status callback.
--
-- KEYS[1] call record hash, KEYS[2] the workspace's unreconciled calls
-- ARGV[1] Twilio CallStatus, ARGV[2] CallDuration in seconds or "",
-- ARGV[3] the callback's SequenceNumber, ARGV[4] call sid
-- Callbacks may arrive out of order; a lower sequence number never
-- overwrites a higher one. Returns 1 if applied, 0 if stale, -1 if no record.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local seen = tonumber(redis.call('HGET', KEYS[1], 'twilio_sequence') or '-1')
local sequence = tonumber(ARGV[3])
if sequence <= seen then
  return 0
end
redis.call('HSET', KEYS[1], 'twilio_status', ARGV[1], 'twilio_sequence', sequence)
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'twilio_call_duration_secs', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[4])
end
return 1
