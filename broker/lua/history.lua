-- Herald: read what a resuming client missed, as one atomic snapshot.
--
-- ARGV[1] key prefix; ARGV[2] "" (Redis's clock) or now (microseconds); ARGV[3] replay ttl (microseconds);
-- ARGV[4] after: the id to resume after ("0" with no topics reads just head and epoch);
-- ARGV[5] replay size: events kept per topic; ARGV[6] n; then n topics.
--
-- Returns {head, epoch, {floor, {id, type, data, id, type, data, ...}} per topic}.
-- head is the last id issued; every retained event of these topics up to head
-- is returned (ids above `after`, younger than the TTL), and any later event is
-- published after this read. A topic's floor is the largest id it may have
-- dropped: a resume from below it can't be exact.
--
-- The replay window is decided here (publish.lua only appends): a topic's
-- events are the newest `size` entries of its stream younger than the TTL.
-- Its floor is the largest of: the stream's max-deleted-entry-id (what the
-- topic had before the stream was created), the entry just before the newest
-- `size` (publish.lua's approximate trim always keeps it), the newest entry
-- older than the TTL, and the legacy floor key herald:f:<topic> (written by
-- version 2's publish.lua, which producers may still run). A stream trimmed
-- to `size` or below by a publisher with a smaller size has dropped entries
-- nobody recorded: its floor is just below its oldest entry. A topic with no
-- stream has floor max(epoch, now - ttl).

local prefix = ARGV[1]
local now = tonumber(ARGV[2])
if now == nil then
  -- No clock given: Redis's own. One clock for the whole deployment, so ids
  -- never run ahead of it and a restart that lost the counter resumes above them.
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local ttl = tonumber(ARGV[3])
local after = ARGV[4]
local size = tonumber(ARGV[5])
local n = tonumber(ARGV[6])

-- (Redis scripts can't share code: fmt and the epoch set-up below are kept
-- identical in publish.lua and history.lua.)
local function fmt(x) return string.format('%.0f', x) end
local function entry_id(id) return tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1)) end

local counter_key = prefix .. ':id'
local state = redis.call('MGET', counter_key, prefix .. ':epoch')
local last = tonumber(state[1] or '0')
local epoch = tonumber(state[2] or '-1')
if epoch < 0 then
  -- A new data set: start it here, so that ids issued from now on are above its epoch.
  epoch = math.max(last, now)
  redis.call('SET', prefix .. ':epoch', fmt(epoch))
  redis.call('SET', counter_key, fmt(epoch))
  last = epoch
end

local cutoff = now - ttl
local topics = {}
for i = 1, n do
  local stream = prefix .. ':s:' .. ARGV[6 + i]
  local info = redis.pcall('XINFO', 'STREAM', stream)
  -- herald:f:<topic>, where contract version 2's publish.lua kept the floor:
  -- a producer still running that script trims exactly and records it there.
  local legacy = redis.call('GET', prefix .. ':f:' .. ARGV[6 + i])
  local floor = tonumber(legacy or '0')
  local flat = {}
  if info.err then
    -- No stream (XINFO's only error here): anything the topic had is older than the TTL or the epoch.
    floor = math.max(floor, epoch, cutoff)
  else
    local length, added, deleted, first = 0, 0, '0-0', nil
    for j = 1, #info, 2 do
      local k = info[j]
      if k == 'length' then length = info[j + 1]
      elseif k == 'entries-added' then added = info[j + 1]
      elseif k == 'max-deleted-entry-id' then deleted = info[j + 1]
      elseif k == 'first-entry' then first = info[j + 1] end
    end
    floor = math.max(floor, entry_id(deleted))
    if length > size then
      -- Past the size: the entry just before the newest `size` is the largest out of the window.
      local out = redis.call('XRANGE', stream, '-', '+', 'COUNT', length - size)
      floor = math.max(floor, entry_id(out[#out][1]))
    elseif added > length and first and not legacy then
      -- Trimmed to the size or below: not by this reader's publish.lua (it keeps size + 1), but by a
      -- producer or node with a smaller size. What it dropped is gone unrecorded: everything before
      -- the oldest entry kept counts as dropped (a reset where the gap held nothing of this topic,
      -- never a hole).
      floor = math.max(floor, entry_id(first[1]) - 1)
    end
    if first and entry_id(first[1]) < cutoff then
      -- Past the TTL: the newest entry older than the cutoff (probed only when the oldest is that old).
      local old = redis.call('XREVRANGE', stream, fmt(cutoff - 1), '-', 'COUNT', 1)
      floor = math.max(floor, entry_id(old[1][1]))
    end
    local start = math.max(tonumber(after), floor) + 1
    for _, entry in ipairs(redis.call('XRANGE', stream, fmt(start), '+')) do
      local fields = entry[2]
      local data, etype = '', ''
      for j = 1, #fields, 2 do
        if fields[j] == 'd' then data = fields[j + 1] elseif fields[j] == 'e' then etype = fields[j + 1] end
      end
      flat[#flat + 1] = string.sub(entry[1], 1, string.find(entry[1], '-', 1, true) - 1)
      flat[#flat + 1] = etype
      flat[#flat + 1] = data
    end
  end
  topics[i] = {fmt(floor), flat}
end
return {fmt(last), fmt(epoch), topics}
