-- Take back the reservation of a call whose lease expired (its process died).
--
-- KEYS[1] quota hash of the call's period, KEYS[2] the call's grant,
-- KEYS[3] the lease sorted set
-- ARGV[1] now ms, ARGV[2] call sid, ARGV[3] lease ms
-- Returns the milliseconds returned to the budget, -1 if the lease is live
-- again (its process reported in time) or the grant is gone, or -2 for a
-- call reclaimed before whose settlement has not happened (the sweeper that
-- took it failed): settle it again. The lease is pushed a lease further, not
-- dropped; the call's settlement drops it with the grant.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return -1
end
local now = tonumber(ARGV[1])
local lease_until = tonumber(redis.call('HGET', KEYS[2], 'lease_until_ms'))
if lease_until > now then
  return -1
end
local state = redis.call('HGET', KEYS[2], 'state')
local again_at = now + tonumber(ARGV[3])
if state == 'reclaimed' then
  redis.call('HSET', KEYS[2], 'lease_until_ms', again_at)
  redis.call('ZADD', KEYS[3], again_at, ARGV[2])
  return -2
end
if state ~= 'active' then
  return -1
end
local held = tonumber(redis.call('HGET', KEYS[2], 'held_ms'))
redis.call('HINCRBY', KEYS[1], 'reserved_ms', -held)
redis.call('HSET', KEYS[2], 'held_ms', 0, 'state', 'reclaimed',
  'lease_until_ms', again_at)
redis.call('ZADD', KEYS[3], again_at, ARGV[2])
return held
