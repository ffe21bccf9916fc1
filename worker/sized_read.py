"""The memory budget's read of new entries: size what waits, then deliver what fits.

One script measures the entries after the group's last-delivered-id and XREADGROUPs only
those that fit in the read's byte grant, atomically (no other consumer can take the
measured ones in between), so a sudden jump in entry size cannot overshoot the budget.
See worker/budget.py for the bound it gives.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from .redisio import Entry, entries_from_read, translated

#: XREADGROUP of the next entries that fit in ``ARGV[4]`` bytes (all field values counted),
#: at most ``ARGV[3]``; with ``ARGV[5]`` = 1 the first is taken whatever its size. Sizes
#: are read (XRANGE after the group's last-delivered-id, in steps of what the rest of the
#: budget holds at ``ARGV[6]`` = AUDIT_MAX_EVENT_BYTES each, so the script itself copies
#: little more than it delivers) and the entries delivered in one script: no consumer can
#: take the measured ones in between. Returns the XREADGROUP reply, an empty list when
#: nothing new waits, or ``"FULL"`` when the next entry does not fit.
_SIZED_READ = """
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then return redis.error_reply('NOGROUP no such key ' .. KEYS[1]) end
local last
for _, g in ipairs(groups) do
  local name, id
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then id = g[i + 1] end
  end
  if name == ARGV[1] then last = id end
end
if not last then return redis.error_reply('NOGROUP no such consumer group ' .. ARGV[1]) end
local want, budget, maxev = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local n, total, start, fits = 0, 0, '(' .. last, true
while n < want and fits do
  local step = math.max(1, math.min(64, want - n, math.floor((budget - total) / maxev)))
  local rows = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', step)
  if #rows == 0 then break end
  for _, row in ipairs(rows) do
    local size, f = 0, row[2]
    for i = 2, #f, 2 do size = size + #f[i] end
    if total + size > budget and not (n == 0 and ARGV[5] == '1') then fits = false break end
    total, n = total + size, n + 1
  end
  start = '(' .. rows[#rows][1]
end
if n == 0 then
  if fits then return {} end
  return {'FULL'}
end
return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', n, 'STREAMS', KEYS[1], '>')
"""


async def read_group_sized(
    redis: aioredis.Redis, group: str, consumer: str, stream: str, count: int,
    max_bytes: int, *, alone: bool, max_event_bytes: int,
) -> tuple[list[Entry], bool]:
    """New entries of one stream, at most ``count`` and ``max_bytes`` (with ``alone``, the
    first whatever its size), sized and read in one script (:data:`_SIZED_READ`), never
    blocking. Returns the entries and whether the next entry did not fit (``full``)."""
    with translated():
        reply = await redis.eval(_SIZED_READ, 1, stream, group, consumer, count, max_bytes,
                                 1 if alone else 0, max_event_bytes)
    if reply and reply[0] in (b"FULL", "FULL"):
        return [], True
    return (entries_from_read(reply) if reply else []), False
