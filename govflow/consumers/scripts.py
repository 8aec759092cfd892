"""The Lua scripts that make each hand-over between keys atomic.

Every script touches keys of one partition only (they share a hash tag), so they run
unchanged on Redis Cluster. Each one acknowledges first and acts only when its XACK
removed the entry from the group's pending list: a second worker finishing the same
entry (after a claim) changes nothing, so an entry is never both waiting and pending,
never in the dead-letter stream twice, and never neither.

Fencing: when partitions are leased (``consumers.partitions``), every hand-over names the
lease key of its partition and the worker that must hold it, and does nothing but return
-1 when another worker holds it: a worker that lost its lease cannot acknowledge. The
owner ``''`` (one partition, no leases) skips the check.

Per-entity order (``consumers.ordering``): an entry that keeps an entity's order names the
entity and its token (the id it was first published under). A retry of such an entry
holds the entity (``held`` hash: entity -> token of the entry in front); entries that
arrive while it is held are parked behind it (``parked`` list, oldest first), not run;
when the entry in front ends (acknowledged or dead-lettered), the next parked one goes
back on the stream as the new entry in front, or the hold is lifted.

The scripts use only commands Redis 6.2 has; docs/REDIS.md lists what newer servers offer.
"""

from __future__ import annotations

# Shared by the hand-over scripts. A parked member is JSON {"hold": token, "fields": [...]}.
_FENCE_AND_RELEASE = """
local function fenced(lease, owner)
  return owner ~= '' and redis.call('GET', lease) ~= owner
end
local function release(stream, held, parked, entity, token)
  if entity == '' or redis.call('HGET', held, entity) ~= token then return end
  local nxt = redis.call('LPOP', parked)
  if nxt then
    local m = cjson.decode(nxt)
    redis.call('XADD', stream, '*', unpack(m['fields']))
    redis.call('HSET', held, entity, m['hold'])
  else
    redis.call('HDEL', held, entity)
  end
end
"""

# KEYS: stream, lease, held, parked. ARGV: group, owner, entity, token, entry ids.
# Returns how many the XACK removed, or -1 when fenced.
ACK = (
    _FENCE_AND_RELEASE
    + """
if fenced(KEYS[2], ARGV[2]) then return -1 end
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 5))
if n > 0 then release(KEYS[1], KEYS[3], KEYS[4], ARGV[3], ARGV[4]) end
return n
"""
)

# KEYS: stream, retry set, lease, held. ARGV: group, owner, entry id, due time (ms),
# member, entity, token. The entity (if any) is held by this entry unless already held.
RETRY = (
    _FENCE_AND_RELEASE
    + """
if fenced(KEYS[3], ARGV[2]) then return -1 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
  if ARGV[6] ~= '' and redis.call('HEXISTS', KEYS[4], ARGV[6]) == 0 then
    redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
  end
  return 1
end
return 0
"""
)

# KEYS: stream, dead-letter stream, lease, held, parked. ARGV: group, owner, entry id,
# entity, token, then the dead letter's field/value pairs.
DEAD_LETTER = (
    _FENCE_AND_RELEASE
    + """
if fenced(KEYS[3], ARGV[2]) then return -1 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
  release(KEYS[1], KEYS[4], KEYS[5], ARGV[4], ARGV[5])
  return 1
end
return 0
"""
)

# KEYS: stream, lease, held, parked. ARGV: group, owner, entry id, entity, token, member.
# Parks the entry behind its entity's hold; with no hold (it ended meanwhile) the entry
# goes back on the stream in front instead. No attempt is counted either way.
PARK = (
    _FENCE_AND_RELEASE
    + """
if fenced(KEYS[2], ARGV[2]) then return -1 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  if redis.call('HEXISTS', KEYS[3], ARGV[4]) == 1 then
    redis.call('RPUSH', KEYS[4], ARGV[6])
  else
    redis.call('XADD', KEYS[1], '*', unpack(cjson.decode(ARGV[6])['fields']))
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  end
  return 1
end
return 0
"""
)

# KEYS: retry set, events stream, commands stream. ARGV: now (ms), how many at most.
# A member is JSON: {"to": "events"|"commands", "fields": [field, value, ...]}.
MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local m = cjson.decode(member)
  local stream = KEYS[2]
  if m['to'] == 'commands' then stream = KEYS[3] end
  redis.call('XADD', stream, '*', unpack(m['fields']))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Renews the lease on the entries the
# consumer still owns (XCLAIM JUSTID resets the idle time without counting a delivery)
# and returns them; an entry another consumer claimed meanwhile is left alone.
RENEW = """
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    table.insert(kept, ARGV[i])
  end
end
return kept
"""

# KEYS: stream. ARGV: group, consumer. XGROUP DELCONSUMER drops a consumer's pending
# entries, so it runs only when there are none.
RETIRE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: owner, ttl (ms). Extends the lease only while ``owner`` holds it.
LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: owner. Gives the lease up only if ``owner`` still holds it.
LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: members. ARGV: worker id, ttl (ms), '1' to leave. Scores by the server's clock, so
# workers on hosts whose clocks disagree still agree on who is alive; returns the live ones.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], 10 * tonumber(ARGV[2]))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
