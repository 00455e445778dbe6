-- Admit a call: take a concurrency lease and reserve its first grant, or refuse.
--
-- KEYS[1] quota hash of the billing period, KEYS[2] the call's grant hash,
-- KEYS[3] the workspace's lease sorted set (call sid -> lease expiry ms),
-- KEYS[4] the workspace's budget event stream
-- ARGV[1] now ms, ARGV[2] grant wanted ms, ARGV[3] lease ms,
-- ARGV[4] max concurrent calls, ARGV[5] the period's limit ms (hard cap),
-- ARGV[6] period label, ARGV[7] smallest useful grant ms, ARGV[8] call sid,
-- ARGV[9] Twilio account sid (so a sweeper can hang the call up)
--
-- Returns {1, granted ms, "ok", available ms, events} or {0, 0, "concurrency"
-- | "budget", 0, events}, where available is what the period had left before
-- this grant and events counts budget events appended (a lowered limit can
-- cross a threshold; a refusal for budget once use has left less than the
-- smallest grant is the period's cut-off). Admitting
-- the same call twice returns its existing grant.
local now = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  local held = tonumber(redis.call('HGET', KEYS[2], 'held_ms'))
  return {1, held, 'ok', held, 0}
end
-- Leases past their expiry belong to vanished processes; they do not count.
local live = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
if live >= tonumber(ARGV[4]) then
  return {0, 0, 'concurrency', 0, 0}
end
redis.call('HSET', KEYS[1], 'limit_ms', ARGV[5])
local events = threshold_events(KEYS[1], KEYS[4], ARGV[6], now)
local used = tonumber(redis.call('HGET', KEYS[1], 'used_ms') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved_ms') or '0')
local available = tonumber(ARGV[5]) - used - reserved
if available < tonumber(ARGV[7]) then
  -- The period's cut-off only once use itself leaves too little: a refusal
  -- while running calls hold the rest may be followed by their giving it back.
  if tonumber(ARGV[5]) - used < tonumber(ARGV[7]) then
    events = events + cutoff_event(KEYS[1], KEYS[4], ARGV[6], now, 'call_refused')
  end
  return {0, 0, 'budget', 0, events}
end
local grant = math.min(tonumber(ARGV[2]), available)
local lease_until = now + tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[1], 'reserved_ms', grant)
redis.call('HSET', KEYS[2], 'held_ms', grant, 'used_ms', 0, 'seq', 0,
  'lease_until_ms', lease_until, 'period', ARGV[6], 'state', 'active',
  'account_sid', ARGV[9])
redis.call('ZADD', KEYS[3], lease_until, ARGV[8])
return {1, grant, 'ok', available, events}
