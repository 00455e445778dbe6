-- Record what Twilio reported about a call in its status callback.
--
-- KEYS[1] call record hash, KEYS[2] the workspace's unreconciled calls,
-- KEYS[3] and KEYS[4] the month and day usage hashes the call's cost went
-- into (any keys of the workspace when it has not settled)
-- ARGV[1] Twilio CallStatus, ARGV[2] CallDuration in seconds or "",
-- ARGV[3] the callback's SequenceNumber, ARGV[4] call sid,
-- ARGV[5] and ARGV[6] the labels of KEYS[3] and KEYS[4]
-- Callbacks may arrive out of order; a lower sequence number never
-- overwrites a higher one. A duration reprices the caller's leg of a settled
-- call by Twilio's billing (each started minute), in the record and in the
-- usage hashes, moving only the difference from what is counted already.
-- Returns 1 if applied, 0 if stale, -1 if no record, -2 if the call settled
-- into other usage hashes than KEYS[3] and KEYS[4] (read them and retry).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local seen = tonumber(redis.call('HGET', KEYS[1], 'twilio_sequence') or '-1')
local sequence = tonumber(ARGV[3])
if sequence <= seen then
  return 0
end
local settled = redis.call('HMGET', KEYS[1], 'status', 'twilio_micros_per_minute',
  'caller_leg_micros', 'usage_period', 'usage_day')
local rate = tonumber(settled[2] or '0')
local reprice = ARGV[2] ~= '' and settled[1] == 'completed' and rate > 0
if reprice and (settled[4] ~= ARGV[5] or settled[5] ~= ARGV[6]) then
  return -2
end
redis.call('HSET', KEYS[1], 'twilio_status', ARGV[1], 'twilio_sequence', sequence)
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'twilio_call_duration_secs', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[4])
end
if reprice then
  local billed = math.floor((tonumber(ARGV[2]) + 59) / 60) * rate
  local delta = billed - tonumber(settled[3] or '0')
  if delta ~= 0 then
    redis.call('HSET', KEYS[1], 'caller_leg_micros', billed)
    redis.call('HINCRBY', KEYS[1], 'cost_micros', delta)
    redis.call('HINCRBY', KEYS[3], 'cost_micros', delta)
    redis.call('HINCRBY', KEYS[4], 'cost_micros', delta)
  end
end
return 1
