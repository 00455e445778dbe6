-- Record that the budget ended a call: the period's cut-off event, once.
--
-- KEYS[1] quota hash of the billing period, KEYS[2] the workspace's budget
-- event stream
-- ARGV[1] period label, ARGV[2] now ms, ARGV[3] reason ("call_ended")
--
-- Returns how many events were appended (0 or 1).
return cutoff_event(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
