-- Take over a call whose process died while its audio flows elsewhere (a SIP
-- call to Retell, still up on Twilio): its lease, and its grant as it stands.
--
-- KEYS[1] the lease sorted set, KEYS[2] the call's grant, KEYS[3] the call
-- record
-- ARGV[1] now ms, ARGV[2] call sid, ARGV[3] lease ms
-- Returns {seq, held ms} of the grant ({0, 0} for a call without one), or
-- false when the lease is live (its process or another adopter has it), the
-- call never started or is over, or its grant was taken back already.
local now = tonumber(ARGV[1])
local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not until_ms or tonumber(until_ms) > now then
  return false
end
if redis.call('HEXISTS', KEYS[3], 'started_at_ms') == 0
    or redis.call('HEXISTS', KEYS[3], 'ended_at_ms') == 1 then
  return false
end
local lease_until = now + tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('HGET', KEYS[2], 'state') ~= 'active' then
    return false
  end
  redis.call('HSET', KEYS[2], 'lease_until_ms', lease_until)
  redis.call('ZADD', KEYS[1], lease_until, ARGV[2])
  return {tonumber(redis.call('HGET', KEYS[2], 'seq')),
    tonumber(redis.call('HGET', KEYS[2], 'held_ms'))}
end
redis.call('ZADD', KEYS[1], lease_until, ARGV[2])
return {0, 0}
