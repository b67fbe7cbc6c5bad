-- Delete a conversation LIST (flush --evict) only if it still holds exactly what was archived.
-- KEYS[1] session list, KEYS[2] lease; ARGV[1] lease token, ARGV[2 ..] the whole list as
-- stored, in Redis order (compared as they are: see replace_prefix.lua).
-- Returns 1 deleted, 0 changed, -1 lease lost
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
if #items ~= #ARGV - 1 then return 0 end
for i = 1, #items do
  if items[i] ~= ARGV[1 + i] then return 0 end
end
redis.call('DEL', KEYS[1])
return 1
