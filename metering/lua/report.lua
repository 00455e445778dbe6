-- Report a call's cumulative use: debit it, renew or settle its grant, count it.
--
-- KEYS[1] quota hash of the call's billing period, KEYS[2] the call's grant,
-- KEYS[3] the lease sorted set, KEYS[4] the call record,
-- KEYS[5] month usage hash, KEYS[6] day usage hash,
-- KEYS[7] the workspace's set of calls awaiting Twilio's duration,
-- KEYS[8] the workspace's budget event stream
-- ARGV[1] report sequence number (1, 2, ...), ARGV[2] cumulative used ms,
-- ARGV[3] grant wanted ms (the held amount to top up to; 0 asks for none),
-- ARGV[4] now ms, ARGV[5] lease ms, ARGV[6] the period's limit ms, used
-- only when the quota hash has none (the hash's limit follows plan changes),
-- ARGV[7] "1" for the final report, ARGV[8] end reason (final only),
-- ARGV[9] agent id, ARGV[10] E.164 number, ARGV[11] billable ms the plan's
-- rounding adds at settlement (final only), ARGV[12] call sid,
-- ARGV[13] the call's cost to serve in micro-units (final only),
-- ARGV[14] the billing period's label, ARGV[15] the caller's leg's part of
-- ARGV[13] (final only), ARGV[16] Twilio's rate per started minute of that
-- leg (final only; 0 leaves the cost as given), ARGV[17] the day's label,
-- ARGV[18] "1" when a final report's total is the call's length by Twilio,
-- which replaces a larger total counted before (time past the real end of a
-- call whose end reports were lost is given back), ARGV[19] "1" when the
-- budget ended the call: its final report records the period's cut-off
-- event, after any threshold event it crosses
--
-- A final report records the cost, the caller's leg's part of it and the
-- labels of the usage hashes it went into, so that Twilio's duration, when it
-- comes, can reprice the leg (twilio_status.lua). When that duration is on the
-- record already, the leg is priced by it here.
--
-- Returns {granted now ms, held ms after, state, added ms, events} with
-- events the number of budget events appended, and state "ok",
-- "settled", "reclaimed" (the grant was taken back: stop the call) or
-- "closed" (settled before: nothing changes). A report whose sequence number
-- is not above the last one returns the same answer as before, so a retry
-- never grants or debits twice.
local seq = tonumber(ARGV[1])
local total = tonumber(ARGV[2])
local final = ARGV[7] == '1'

if redis.call('EXISTS', KEYS[4]) == 0 then
  return {0, 0, 'closed', 0, 0}
end
if redis.call('HGET', KEYS[4], 'status') == 'completed' then
  return {0, 0, 'closed', 0, 0}
end
local has_grant = redis.call('EXISTS', KEYS[2]) == 1
if has_grant then
  local last = tonumber(redis.call('HGET', KEYS[2], 'seq'))
  if seq <= last then
    local seen = redis.call('HGET', KEYS[2], 'state')
    if seen == 'active' then seen = 'ok' end
    return {0, tonumber(redis.call('HGET', KEYS[2], 'held_ms')), seen, 0, 0}
  end
end

-- Usage: only what is above the total already recorded counts, unless the
-- total is Twilio's length of the call.
local previous = tonumber(redis.call('HGET', KEYS[4], 'metered_ms') or '0')
local added = 0
if total > previous or (final and ARGV[18] == '1') then
  added = total - previous
end
if added ~= 0 then
  redis.call('HSET', KEYS[4], 'metered_ms', total)
  local agent_field = 'agent:' .. ARGV[9] .. ':ms'
  local number_field = 'number:' .. ARGV[10] .. ':ms'
  for i = 5, 6 do
    redis.call('HINCRBY', KEYS[i], 'ms', added)
    redis.call('HINCRBY', KEYS[i], agent_field, added)
    redis.call('HINCRBY', KEYS[i], number_field, added)
  end
  redis.call('HINCRBY', KEYS[1], 'used_ms', added)
end

local granted = 0
local held = 0
local state = 'ok'
if has_grant then
  held = tonumber(redis.call('HGET', KEYS[2], 'held_ms'))
  state = redis.call('HGET', KEYS[2], 'state')
  -- Used time comes out of the call's reservation first; beyond it, the
  -- call overran its grant and the overrun is plain debit.
  local release = math.min(math.max(added, 0), held)
  held = held - release
  if state == 'active' then
    redis.call('HINCRBY', KEYS[1], 'reserved_ms', -release)
  end
end

if final then
  if has_grant and state == 'active' then
    redis.call('HINCRBY', KEYS[1], 'reserved_ms', -held)
  end
  redis.call('HINCRBY', KEYS[1], 'used_ms', tonumber(ARGV[11]))
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[12])
  local cost = tonumber(ARGV[13])
  local leg = tonumber(ARGV[15])
  local rate = tonumber(ARGV[16])
  local twilio_secs = redis.call('HGET', KEYS[4], 'twilio_call_duration_secs')
  if twilio_secs and rate > 0 then
    local billed = math.floor((tonumber(twilio_secs) + 59) / 60) * rate
    cost = cost - leg + billed
    leg = billed
  end
  redis.call('HSET', KEYS[4], 'status', 'completed', 'ended_at_ms', ARGV[4],
    'end_reason', ARGV[8], 'billable_extra_ms', ARGV[11], 'cost_micros', cost,
    'caller_leg_micros', leg, 'twilio_micros_per_minute', rate,
    'usage_period', ARGV[14], 'usage_day', ARGV[17])
  for i = 5, 6 do
    redis.call('HINCRBY', KEYS[i], 'cost_micros', cost)
  end
  if redis.call('HEXISTS', KEYS[4], 'twilio_call_duration_secs') == 0 then
    redis.call('ZADD', KEYS[7], ARGV[4], ARGV[12])
  end
  local events = threshold_events(KEYS[1], KEYS[8], ARGV[14], ARGV[4])
  if ARGV[19] == '1' then
    events = events + cutoff_event(KEYS[1], KEYS[8], ARGV[14], ARGV[4], 'call_ended')
  end
  return {0, 0, 'settled', added, events}
end

if has_grant and state == 'active' then
  -- The limit in the hash is the plan's current one: admission and every
  -- plan change write it, so running calls follow a change at this report.
  local limit = tonumber(redis.call('HGET', KEYS[1], 'limit_ms') or ARGV[6])
  local used = tonumber(redis.call('HGET', KEYS[1], 'used_ms') or '0')
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved_ms') or '0')
  local available = limit - used - reserved
  local wanted = tonumber(ARGV[3]) - held
  if wanted > 0 and available > 0 then
    granted = math.min(wanted, available)
    held = held + granted
    redis.call('HINCRBY', KEYS[1], 'reserved_ms', granted)
  end
  local lease_until = tonumber(ARGV[4]) + tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], 'lease_until_ms', lease_until)
  redis.call('ZADD', KEYS[3], lease_until, ARGV[12])
end
if has_grant then
  redis.call('HSET', KEYS[2], 'held_ms', held, 'used_ms', total, 'seq', seq)
elseif tonumber(ARGV[5]) > 0 then
  -- A call without a budget holds a lease all the same, so that a sweeper
  -- can settle it and hang it up if its process dies.
  redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[12])
end
if state == 'active' then state = 'ok' end
local events = 0
if added > 0 then
  events = threshold_events(KEYS[1], KEYS[8], ARGV[14], ARGV[4])
end
return {granted, held, state, added, events}
