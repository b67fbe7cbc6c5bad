-- Replace the oldest `n` elements of a conversation LIST by `replacement`, only if those `n`
-- elements are still exactly what the consolidator read (compare-and-swap), and only while the
-- caller still holds the session's lease. Elements the agent appended meanwhile stay. The key's
-- TTL is kept even when the trim empties the list (Redis deletes an empty list, and its TTL).
-- KEYS[1] session list, KEYS[2] lease
-- ARGV[1] lease token, ARGV[2] n, ARGV[3] sha1 of the prefix ("len:bytes" per element, oldest
-- first), ARGV[4] "1" when the agent pushes newest first (LPUSH), ARGV[5..] replacement, oldest first
-- Returns {1, memory after} done, {0, 0} prefix changed, {-1, 0} lease lost. The memory lets
-- the scanner tell later whether anyone wrote to the key since.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {-1, 0} end
local n = tonumber(ARGV[2])
local newest_first = ARGV[4] == '1'
local prefix
if newest_first then
  prefix = redis.call('LRANGE', KEYS[1], -n, -1)
else
  prefix = redis.call('LRANGE', KEYS[1], 0, n - 1)
end
if #prefix ~= n then return {0, 0} end
local parts = {}
if newest_first then
  for i = n, 1, -1 do parts[#parts + 1] = string.len(prefix[i]) .. ':' .. prefix[i] end
else
  for i = 1, n do parts[#parts + 1] = string.len(prefix[i]) .. ':' .. prefix[i] end
end
if redis.sha1hex(table.concat(parts)) ~= ARGV[3] then return {0, 0} end
local ttl = redis.call('PTTL', KEYS[1])
local m = #ARGV - 4
if newest_first then
  redis.call('LTRIM', KEYS[1], 0, -(n + 1))
  for i = m, 1, -1 do redis.call('RPUSH', KEYS[1], ARGV[4 + i]) end
else
  redis.call('LTRIM', KEYS[1], n, -1)
  for i = m, 1, -1 do redis.call('LPUSH', KEYS[1], ARGV[4 + i]) end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {1, 0} end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {1, redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')}
