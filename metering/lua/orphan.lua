-- Take the lease of a call that holds no grant (its workspace has no budget)
-- once it has expired: its process died, and a sweeper is to settle it.
--
-- KEYS[1] the lease sorted set, KEYS[2] the call's grant, KEYS[3] the call
-- record
-- ARGV[1] now ms, ARGV[2] call sid, ARGV[3] lease ms
-- Returns the call's Twilio account sid ("" when the record names none), or
-- false when the lease is live again, belongs to a grant, or the call is over.
-- The lease is not dropped but pushed a lease further: the call's settlement
-- drops it, and if the sweeper fails before that, a later sweep takes it again.
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not until_ms or tonumber(until_ms) > tonumber(ARGV[1]) then
  return false
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
if redis.call('EXISTS', KEYS[3]) == 0 or
    redis.call('HEXISTS', KEYS[3], 'ended_at_ms') == 1 then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return false
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), ARGV[2])
return redis.call('HGET', KEYS[3], 'account_sid') or ''
