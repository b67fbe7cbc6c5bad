-- Delete a conversation LIST (flush --evict) only if it still holds exactly what was archived.
-- KEYS[1] session list, KEYS[2] lease; ARGV[1] lease token, ARGV[2] sha1 of the whole list as
-- stored ("len:bytes" per element, in Redis order). Returns 1 deleted, 0 changed, -1 lease lost
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local parts = {}
for i = 1, #items do parts[#parts + 1] = string.len(items[i]) .. ':' .. items[i] end
if redis.sha1hex(table.concat(parts)) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
