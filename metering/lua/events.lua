-- Budget events, shared by admit.lua and report.lua (the quota engine puts
-- this text in front of theirs).
--
-- Each event is appended to the workspace's event stream at most once per
-- billing period: a field of the period's quota hash marks it as emitted, in
-- the same script that moved the budget, so no crash or retry can lose one or
-- emit one twice. Delivery to webhooks reads the stream (metering.delivery).

-- Append the 50, 80 and 100 percent events the quota hash's use has reached.
-- Returns how many were new.
local function threshold_events(quota_key, events_key, period, now_ms)
  local limit = tonumber(redis.call('HGET', quota_key, 'limit_ms') or '0')
  if limit <= 0 then
    return 0
  end
  local used = tonumber(redis.call('HGET', quota_key, 'used_ms') or '0')
  local emitted = 0
  for _, percent in ipairs({50, 80, 100}) do
    if used * 100 >= limit * percent
      and redis.call('HSETNX', quota_key, 'event:' .. percent, now_ms) == 1 then
      redis.call('XADD', events_key, '*', 'kind', tostring(percent),
        'period', period, 'used_ms', used, 'allowance_ms', limit, 'at_ms', now_ms)
      emitted = emitted + 1
    end
  end
  return emitted
end

-- Append the period's cut-off event, unless it already has one. ``reason``
-- says how the budget stopped a call: "call_refused" or "call_ended".
local function cutoff_event(quota_key, events_key, period, now_ms, reason)
  if redis.call('HSETNX', quota_key, 'event:cutoff', now_ms) == 0 then
    return 0
  end
  local used = tonumber(redis.call('HGET', quota_key, 'used_ms') or '0')
  local limit = tonumber(redis.call('HGET', quota_key, 'limit_ms') or '0')
  redis.call('XADD', events_key, '*', 'kind', 'cutoff', 'period', period,
    'used_ms', used, 'allowance_ms', limit, 'at_ms', now_ms, 'reason', reason)
  return 1
end
