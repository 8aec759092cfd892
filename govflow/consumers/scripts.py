"""The Lua scripts that make each hand-over between keys atomic, and how to call them.

Each script has a name that says what it does and a function of that name, in lower
case, that builds its call from keyword arguments (``ScriptCall``), so no caller lays out
KEYS and ARGV by position; ``Streams`` runs the calls.

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

Atomic on error: Redis keeps what a script wrote before an error, so every script checks
its inputs (the values it will unpack, the members it will decode) before its first write,
and refuses with an error that changed nothing. ``unpack`` fails above about 8,000 values.

The scripts use only commands Redis 6.2 has; docs/REDIS.md lists what newer servers offer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from govflow.schemas.codec import encode
from govflow.schemas.keys import Role

# The most values a script passes to one command through ``unpack``: well below Lua's
# limit. Callers stay far below it (``Entry`` refuses entries with more fields than the
# wire format has; acknowledgements go 1,000 ids to a call).
MAX_UNPACK = 4000

# Checks every script makes before it writes: a field list XADD can take.
_CHECKS = f"""
local MAX_UNPACK = {MAX_UNPACK}
local function check_count(n, what)
  if n > MAX_UNPACK then
    return redis.error_reply('ERR govflow: ' .. what .. ': ' .. n .. ' values, over ' .. MAX_UNPACK)
  end
end
local function check_fields(fields, what)
  if type(fields) ~= 'table' or #fields < 2 or #fields % 2 ~= 0 then
    return redis.error_reply('ERR govflow: ' .. what .. ': not field/value pairs')
  end
  return check_count(#fields, what)
end
local function decode_member(member)
  local ok, m = pcall(cjson.decode, member)
  if not ok or type(m) ~= 'table' then return nil end
  return m
end
"""

# Shared by the hand-over scripts. A parked member is JSON {"hold": token, "fields": [...]}.
_FENCE_AND_RELEASE = (
    _CHECKS
    + """
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
)

# KEYS: stream, lease, held, parked. ARGV: group, owner, entity, token, entry ids.
# Returns how many the XACK removed, or -1 when fenced.
ACKNOWLEDGE = (
    _FENCE_AND_RELEASE
    + """
local bad = check_count(#ARGV - 4, 'ids')
if bad then return bad end
if fenced(KEYS[2], ARGV[2]) then return -1 end
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 5))
if n > 0 then release(KEYS[1], KEYS[3], KEYS[4], ARGV[3], ARGV[4]) end
return n
"""
)

# The Redis server's clock in milliseconds. Retries are scheduled and moved by this one
# clock, so workers and movers on hosts whose clocks disagree still agree on what is due.
# A script that reads TIME and then writes is replicated by its effects (the default from
# Redis 5; govflow needs 6.2).
_SERVER_NOW = """
local function server_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: stream, retry set, lease, held. ARGV: group, owner, entry id, delay (ms), member,
# entity, token. The entity (if any) is held by this entry unless already held.
ACK_AND_SCHEDULE_RETRY = (
    _FENCE_AND_RELEASE
    + _SERVER_NOW
    + """
local m = decode_member(ARGV[5])
local bad = check_fields(m and m['fields'], 'retry')
if bad then return bad end
if fenced(KEYS[3], ARGV[2]) then return -1 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[2], server_now_ms() + tonumber(ARGV[4]), ARGV[5])
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
ACK_AND_DEAD_LETTER = (
    _FENCE_AND_RELEASE
    + """
local bad = check_count(#ARGV - 5, 'dead letter')
if bad then return bad end
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
ACK_AND_PARK = (
    _FENCE_AND_RELEASE
    + """
local m = decode_member(ARGV[6])
local bad = check_fields(m and m['fields'], 'parked entry')
if bad then return bad end
if fenced(KEYS[2], ARGV[2]) then return -1 end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[3]) == 1 then
  if redis.call('HEXISTS', KEYS[3], ARGV[4]) == 1 then
    redis.call('RPUSH', KEYS[4], ARGV[6])
  else
    redis.call('XADD', KEYS[1], '*', unpack(m['fields']))
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  end
  return 1
end
return 0
"""
)

# KEYS: retry set, events stream, commands stream, dead-letter stream. ARGV: how many at
# most. A member is JSON: {"to": "events"|"commands", "fields": [...]}. Every member is
# checked first; one no stream can take (a script of an older govflow wrote it, or a
# hand) goes to the dead-letter stream, so it cannot stop the others for good.
MOVE_DUE_RETRIES = (
    _CHECKS
    + _SERVER_NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', server_now_ms(), 'LIMIT', 0, ARGV[1])
local decoded = {}
for i, member in ipairs(due) do
  local m = decode_member(member)
  if check_fields(m and m['fields'], 'retry') then decoded[i] = false else decoded[i] = m end
end
for i, member in ipairs(due) do
  local m = decoded[i]
  if m then
    local stream = KEYS[2]
    if m['to'] == 'commands' then stream = KEYS[3] end
    redis.call('XADD', stream, '*', unpack(m['fields']))
  else
    redis.call('XADD', KEYS[4], '*', 'stream', KEYS[1], 'error',
      'a scheduled retry no stream can take', 'payload.member', string.sub(member, 1, 65536))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""
)

# KEYS: stream. ARGV: group, consumer, entry ids. Renews the lease on the entries the
# consumer still owns (XCLAIM JUSTID resets the idle time without counting a delivery)
# and returns them; an entry another consumer claimed meanwhile is left alone.
RENEW_PENDING = """
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
RETIRE_IDLE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: owner, ttl (ms). Extends the lease only while ``owner`` holds it.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: owner. Gives the lease up only if ``owner`` still holds it.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: members. ARGV: worker id, ttl (ms), '1' to leave. Scores by the server's clock, so
# workers on hosts whose clocks disagree still agree on who is alive; returns the live ones.
BEAT = """
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


# KEYS: events stream, commands stream, retry set, held (triggers), held (actions).
# ARGV: limit, triggers group, actions group, where the events and the commands not yet
# delivered start (an XRANGE start), how many execution ids, the execution ids, how many
# event ids, the event ids, then entity ids. Reads only. Returns {undecided (1 when a
# place held more than `limit` entries, so not all was looked at), the execution ids
# found, the event ids found, the entities held}.
FIND_TRACES = """
local limit = tonumber(ARGV[1])
local n = tonumber(ARGV[6])
local m = tonumber(ARGV[7 + n])
local executions, events = {}, {}
for i = 7, 6 + n do executions[ARGV[i]] = true end
for i = 8 + n, 7 + n + m do events[ARGV[i]] = true end
local found_exec, found_event, seen, undecided = {}, {}, {}, 0
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
local function look(flat, role)
  if role == 'commands' then
    -- the command's own id comes before its event in the JSON: the first match is it
    local id = string.match(field(flat, 'command') or '', '"execution_id":"([^"]+)"')
    if id and executions[id] and not seen[id] then
      seen[id] = true
      table.insert(found_exec, id)
    end
  else
    local ok, event = pcall(cjson.decode, field(flat, 'event') or '')
    local id = ok and type(event) == 'table' and event['id']
    if type(id) == 'string' and events[id] and not seen[id] then
      seen[id] = true
      table.insert(found_event, id)
    end
  end
end
local function scan(stream, group, start, role)
  local entries = redis.call('XRANGE', stream, start, '+', 'COUNT', limit)
  if #entries >= limit then undecided = 1 end
  for _, e in ipairs(entries) do look(e[2], role) end
  local pending = redis.pcall('XPENDING', stream, group, '-', '+', limit)
  if pending['err'] then return end -- no group yet: nothing delivered
  if #pending >= limit then undecided = 1 end
  for _, p in ipairs(pending) do
    local one = redis.call('XRANGE', stream, p[1], p[1])
    if #one == 1 then look(one[1][2], role) end
  end
end
scan(KEYS[1], ARGV[2], ARGV[4], 'events')
scan(KEYS[2], ARGV[3], ARGV[5], 'commands')
if redis.call('ZCARD', KEYS[3]) > limit then undecided = 1 end
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, limit - 1)) do
  local retry = cjson.decode(member)
  look(retry['fields'], retry['to'])
end
local held = {}
for i = 8 + n + m, #ARGV do
  if redis.call('HEXISTS', KEYS[4], ARGV[i]) == 1 or redis.call('HEXISTS', KEYS[5], ARGV[i]) == 1 then
    table.insert(held, ARGV[i])
  end
end
return {undecided, found_exec, found_event, held}
"""


# KEYS: stream. ARGV: a field name, then one value per entry. Adds an entry per value, each
# with that one field; returns how many. One call where a pipeline of XADDs cost the
# client a command to pack and a reply to parse per entry. XADD takes any value, so there
# is nothing to check first.
APPEND = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
end
return #ARGV - 1
"""


# KEYS: stream. ARGV: the boundary (an id: every group acknowledged every entry below it),
# how many entries to keep, the most to remove. Removes the oldest entries below the
# boundary while more than that many are kept, at most that many; returns how many went.
# Only the entries it removes (and the one after them) are read, inside Redis.
TRIM_ACKNOWLEDGED = """
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if excess <= 0 then return 0 end
local n = math.min(excess, tonumber(ARGV[3]))
local below = redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[1], 'COUNT', n + 1)
if #below == 0 then return 0 end
local first_kept = ARGV[1]
if #below > n then first_kept = below[n + 1][1] end
return redis.call('XTRIM', KEYS[1], 'MINID', first_kept)
"""


class ScriptCall(msgspec.Struct, frozen=True):
    """One call of a script: its source, then its KEYS and ARGV in the script's order."""

    lua: str
    keys: list[str]
    args: list[str | int | bytes]


class Fence(msgspec.Struct, frozen=True):
    """The lease a hand-over requires: ``key`` held by ``owner``."""

    key: str
    owner: str


class EntityOrder(msgspec.Struct, frozen=True, kw_only=True):
    """The entity whose order an entry keeps, its token, and the keys that record both.

    Attributes:
        held: the partition's hash of held entities (entity -> token of the one in front).
        parked: the entity's list of entries parked behind the one in front.
    """

    entity: str
    token: str
    held: str
    parked: str


def _fence(stream: str, fence: Fence | None) -> tuple[str, str]:
    """The lease key and owner; without a fence, owner ``''`` skips the check.

    A key the script never reads still has to share the stream's slot: the stream's own.
    """
    return (fence.key, fence.owner) if fence is not None else (stream, "")


def _order(stream: str, order: EntityOrder | None) -> tuple[str, str, str, str]:
    """held, parked, entity, token; entity ``''`` leaves the (stream-named) keys alone."""
    if order is None:
        return stream, stream, "", ""
    return order.held, order.parked, order.entity, order.token


def acknowledge(
    *,
    stream: str,
    group: str,
    ids: Sequence[str],
    fence: Fence | None,
    order: EntityOrder | None = None,
) -> ScriptCall:
    """XACK ``ids``; when one was removed and is in front of its entity, release the next."""
    lease, owner = _fence(stream, fence)
    held, parked, entity, token = _order(stream, order)
    return ScriptCall(
        ACKNOWLEDGE, [stream, lease, held, parked], [group, owner, entity, token, *ids]
    )


def ack_and_schedule_retry(
    *,
    stream: str,
    group: str,
    entry_id: str,
    retry_set: str,
    delay_ms: int,
    to: Role,
    fields: Mapping[bytes, bytes],
    fence: Fence | None,
    order: EntityOrder | None = None,
) -> ScriptCall:
    """XACK the entry and, if that removed it, schedule it to go back on ``to`` in ``delay_ms``.

    The due time is the Redis server's clock plus the delay, the clock the mover reads.
    """
    lease, owner = _fence(stream, fence)
    held, _, entity, token = _order(stream, order)
    member = encode({"to": to, "id": entry_id, "fields": _flat(fields)})
    return ScriptCall(
        ACK_AND_SCHEDULE_RETRY,
        [stream, retry_set, lease, held],
        [group, owner, entry_id, delay_ms, member, entity, token],
    )


def ack_and_dead_letter(
    *,
    stream: str,
    group: str,
    entry_id: str,
    dead_stream: str,
    letter: Mapping[str, str],
    fence: Fence | None,
    order: EntityOrder | None = None,
) -> ScriptCall:
    """XACK the entry and, if that removed it, add ``letter`` to the dead-letter stream."""
    lease, owner = _fence(stream, fence)
    held, parked, entity, token = _order(stream, order)
    flat = [x for kv in letter.items() for x in kv]
    return ScriptCall(
        ACK_AND_DEAD_LETTER,
        [stream, dead_stream, lease, held, parked],
        [group, owner, entry_id, entity, token, *flat],
    )


def ack_and_park(
    *,
    stream: str,
    group: str,
    entry_id: str,
    fields: Mapping[bytes, bytes],
    fence: Fence | None,
    order: EntityOrder,
) -> ScriptCall:
    """XACK the entry and, if that removed it, park it behind its entity's hold."""
    lease, owner = _fence(stream, fence)
    member = encode({"hold": order.token, "fields": _flat(fields)})
    return ScriptCall(
        ACK_AND_PARK,
        [stream, lease, order.held, order.parked],
        [group, owner, entry_id, order.entity, order.token, member],
    )


def move_due_retries(
    *, retry_set: str, events: str, commands: str, dead: str, limit: int
) -> ScriptCall:
    """Put up to ``limit`` retries due by the Redis server's clock back on their streams."""
    return ScriptCall(MOVE_DUE_RETRIES, [retry_set, events, commands, dead], [limit])


def renew_pending(*, stream: str, group: str, consumer: str, ids: Sequence[str]) -> ScriptCall:
    """Reset the idle time of those of ``ids`` that ``consumer`` still owns; list them."""
    return ScriptCall(RENEW_PENDING, [stream], [group, consumer, *ids])


def retire_idle_consumer(*, stream: str, group: str, consumer: str) -> ScriptCall:
    """Delete ``consumer`` from its group if nothing is pending for it."""
    return ScriptCall(RETIRE_IDLE_CONSUMER, [stream], [group, consumer])


def append(*, stream: str, field: bytes, values: Sequence[bytes]) -> ScriptCall:
    """Add one entry to ``stream`` per value, each with the one field ``field``."""
    return ScriptCall(APPEND, [stream], [field, *values])


def trim_acknowledged(*, stream: str, below: str, keep: int, limit: int) -> ScriptCall:
    """Remove up to ``limit`` of the oldest entries below id ``below``, keeping ``keep``."""
    return ScriptCall(TRIM_ACKNOWLEDGED, [stream], [below, keep, limit])


def renew_lease(*, lease: str, owner: str, ttl_ms: int) -> ScriptCall:
    """Extend ``lease`` by ``ttl_ms`` if ``owner`` holds it."""
    return ScriptCall(RENEW_LEASE, [lease], [owner, ttl_ms])


def release_lease(*, lease: str, owner: str) -> ScriptCall:
    """Delete ``lease`` if ``owner`` holds it."""
    return ScriptCall(RELEASE_LEASE, [lease], [owner])


def beat(*, members: str, worker: str, ttl_ms: int, leaving: bool = False) -> ScriptCall:
    """Say ``worker`` is alive (or leaving) in ``members``; list the live members."""
    return ScriptCall(BEAT, [members], [worker, ttl_ms, 1 if leaving else 0])


def find_traces(
    *,
    streams: tuple[str, str],
    groups: tuple[str, str],
    starts: tuple[str, str],
    retry_set: str,
    held: tuple[str, str],
    execution_ids: Sequence[str],
    event_ids: Sequence[str],
    entities: Sequence[str],
    limit: int,
) -> ScriptCall:
    """Look for what still carries some executions and events in one partition.

    ``streams``, ``groups``, ``starts`` and ``held`` each name the events side, then the
    commands side; a start is where the entries not yet delivered to the group begin.
    """
    return ScriptCall(
        FIND_TRACES,
        [*streams, retry_set, *held],
        [
            limit, *groups, *starts,
            len(execution_ids), *execution_ids, len(event_ids), *event_ids, *entities,
        ],
    )  # fmt: skip


def _flat(fields: Mapping[bytes, bytes]) -> list[str]:
    flat: list[str] = []
    for k, v in fields.items():
        flat += [k.decode(errors="replace"), v.decode(errors="replace")]
    return flat
