-- Extend the lease only if it is still ours. ARGV[2] is the new TTL in milliseconds.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
