-- Probe many session keys in one call, without touching them (no command here counts as an
-- access, so probing never makes a session look active): remaining TTL, idle time, memory, and
-- with ARGV[1] = '1' the `last_active` field of each session's metadata hash.
-- KEYS[1..n] session keys; with metadata, KEYS[n+1..2n] their metadata hashes, in the same order
-- ARGV[1] '1' when metadata hashes follow the session keys
-- Returns 4 values per session key: PTTL (-2 gone), OBJECT IDLETIME or false (LFU policies keep
-- none), MEMORY USAGE (SAMPLES 0) or false, last_active or false.
local meta = ARGV[1] == '1'
local n = meta and #KEYS / 2 or #KEYS
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local ttl = redis.call('PTTL', key)
  local idle, memory, active = false, false, false
  if ttl ~= -2 then
    idle = redis.pcall('OBJECT', 'IDLETIME', key)
    if type(idle) ~= 'number' then idle = false end
    memory = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', '0')
    if type(memory) ~= 'number' then memory = false end
    if meta then
      active = redis.pcall('HGET', KEYS[n + i], 'last_active')
      if type(active) ~= 'string' then active = false end
    end
  end
  out[#out + 1] = ttl
  out[#out + 1] = idle
  out[#out + 1] = memory
  out[#out + 1] = active
end
return out
