-- Mark a routed call as connected and count it, once.
--
-- KEYS[1] call record hash, KEYS[2] month usage hash, KEYS[3] day usage hash,
-- KEYS[4] the workspace's lease sorted set
-- ARGV[1] started-at ms, ARGV[2] agent id, ARGV[3] E.164 number,
-- ARGV[4] stream sid, ARGV[5] when the call's first lease expires (ms; 0 for
-- a call whose admission took its lease already), ARGV[6] call sid
-- ARGV[7] and ARGV[8] the labels of KEYS[2] and KEYS[3], kept on the record
-- so that whoever settles the call counts it where it started
-- Returns 1 when the call was started now, 0 if it had started before or was
-- settled already (Twilio's callbacks may come out of order: a leg's late
-- "in-progress" must not reopen a call its end report closed), -1 when no
-- record exists.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HEXISTS', KEYS[1], 'started_at_ms') == 1
  or redis.call('HGET', KEYS[1], 'status') == 'completed' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'in-progress', 'started_at_ms', ARGV[1],
  'stream_sid', ARGV[4], 'metered_ms', 0, 'usage_period', ARGV[7],
  'usage_day', ARGV[8])
if tonumber(ARGV[5]) > 0 then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
end
for i = 2, 3 do
  redis.call('HINCRBY', KEYS[i], 'calls', 1)
  redis.call('HINCRBY', KEYS[i], 'agent:' .. ARGV[2] .. ':calls', 1)
  redis.call('HINCRBY', KEYS[i], 'number:' .. ARGV[3] .. ':calls', 1)
end
return 1
