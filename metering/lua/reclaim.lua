-- Take back the reservation of a call whose lease expired (its process died).
--
-- KEYS[1] quota hash of the call's period, KEYS[2] the call's grant,
-- KEYS[3] the lease sorted set
-- ARGV[1] now ms, ARGV[2] call sid
-- Returns the milliseconds returned to the budget, or -1 if the lease is
-- live again (its process reported in time) or the grant is gone.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return -1
end
local lease_until = tonumber(redis.call('HGET', KEYS[2], 'lease_until_ms'))
if lease_until > tonumber(ARGV[1]) then
  return -1
end
if redis.call('HGET', KEYS[2], 'state') ~= 'active' then
  return -1
end
local held = tonumber(redis.call('HGET', KEYS[2], 'held_ms'))
redis.call('HINCRBY', KEYS[1], 'reserved_ms', -held)
redis.call('HSET', KEYS[2], 'held_ms', 0, 'state', 'reclaimed')
redis.call('ZREM', KEYS[3], ARGV[2])
return held
