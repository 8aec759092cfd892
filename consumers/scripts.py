"""The Lua scripts that make each hand-over between keys atomic.

Every script touches keys of one partition only (they share a hash tag), so they run
unchanged on Redis Cluster. Each one acknowledges first and acts only when its XACK
removed the entry from the group's pending list: a second worker finishing the same
entry (after a claim) changes nothing, so an entry is never both waiting and pending,
never in the dead-letter stream twice, and never neither.

On Redis 8.2+ ``XACKDEL`` and on 8.8 ``XNACK`` would shorten ``RETRY``; the servers this
project tests on (6.2 embedded, 7.0 in CI) have neither, so they are not used.
"""

from __future__ import annotations

# KEYS: stream, retry set. ARGV: group, entry id, due time (ms), member.
RETRY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

# KEYS: stream, dead-letter stream. ARGV: group, entry id, then field/value pairs.
DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
"""

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
