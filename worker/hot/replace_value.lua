-- Replace a whole STRING value (layouts that keep the conversation as one JSON document) only if
-- it is still exactly what the consolidator read, while the caller holds the lease. KEEPTTL
-- keeps the expiry the agent set. An empty ARGV[3] deletes the key (evict).
-- KEYS[1] session key, KEYS[2] lease
-- ARGV[1] lease token, ARGV[2] sha1 of the value read, ARGV[3] new value
-- Returns {1, memory after} done, {0, 0} value changed, {-1, 0} lease lost
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {-1, 0} end
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[2] then return {0, 0} end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
  return {1, 0}
end
redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
return {1, redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')}
