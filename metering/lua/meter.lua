-- Apply a call's cumulative metered milliseconds to its record and counters.
--
-- KEYS[1] call record hash, KEYS[2] month usage hash, KEYS[3] day usage hash
-- ARGV[1] cumulative metered ms for the call so far
-- ARGV[2] agent id, ARGV[3] E.164 number
-- ARGV[4] ended-at ms, or "" while the call is live
-- ARGV[5] end reason, or "" while the call is live
--
-- Reports carry totals, not increments: only the part above what the record
-- already holds is added, so a retried or reordered report changes nothing.
-- Returns the milliseconds added by this call; -1 if there is no record, and
-- -2 for a live report on a call that was already closed (by another process
-- that settled it), which must add nothing.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if ARGV[4] == '' and redis.call('HGET', KEYS[1], 'status') == 'completed' then
  return -2
end
local previous = tonumber(redis.call('HGET', KEYS[1], 'metered_ms') or '0')
local total = tonumber(ARGV[1])
local delta = 0
if total > previous then
  delta = total - previous
  redis.call('HSET', KEYS[1], 'metered_ms', total)
  local agent_field = 'agent:' .. ARGV[2] .. ':ms'
  local number_field = 'number:' .. ARGV[3] .. ':ms'
  for i = 2, 3 do
    redis.call('HINCRBY', KEYS[i], 'ms', delta)
    redis.call('HINCRBY', KEYS[i], agent_field, delta)
    redis.call('HINCRBY', KEYS[i], number_field, delta)
  end
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'status') ~= 'completed' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'ended_at_ms', ARGV[4],
    'end_reason', ARGV[5])
end
return delta
