-- Take, renew or release a lease held by one owner. KEYS: 1 lease key.
-- ARGV: 1 'take' | 'renew' | 'release', 2 owner, 3 ttl ms.
-- Returns 1 when the caller holds (or released) the lease, 0 otherwise.
local op, owner = ARGV[1], ARGV[2]
local holder = redis.call('GET', KEYS[1])
if op == 'take' then
  if holder and holder ~= owner then return 0 end
  redis.call('SET', KEYS[1], owner, 'PX', ARGV[3])
  return 1
end
if holder ~= owner then return 0 end
if op == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
