-- Herald: read what a resuming client missed, as one atomic snapshot.
--
-- ARGV[1] key prefix; ARGV[2] "" (Redis's clock) or now (microseconds); ARGV[3] replay ttl (microseconds);
-- ARGV[4] after: the id to resume after ("0" with no topics reads just head and epoch);
-- ARGV[5] n; then n topics.
--
-- Returns {head, epoch, {floor, {id, type, data, id, type, data, ...}} per topic}.
-- head is the last id issued; every retained event of these topics up to head
-- is returned (ids above `after`, younger than the TTL), and any later event is
-- published after this read. A topic's floor is the largest id it may have
-- dropped: a resume from below it can't be exact.

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
local n = tonumber(ARGV[5])

-- (Redis scripts can't share code: the helpers and the epoch set-up below
-- are kept identical in publish.lua and history.lua.)
local function fmt(x) return string.format('%.0f', x) end
local function entry_id(entry) return tonumber((string.gsub(entry[1], '-.*', ''))) end

local counter_key = prefix .. ':id'
local last = tonumber(redis.call('GET', counter_key) or '0')
local epoch = tonumber(redis.call('GET', prefix .. ':epoch') or '-1')
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
  local stream = prefix .. ':s:' .. ARGV[5 + i]
  local floor = tonumber(redis.call('GET', prefix .. ':f:' .. ARGV[5 + i]) or '0')
  if redis.call('EXISTS', stream) == 0 then
    floor = math.max(floor, epoch, cutoff)
  else
    -- Events past the TTL that no publish has trimmed yet count as dropped.
    -- (Probed only when the oldest entry is that old: see publish.lua.)
    local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #oldest > 0 and entry_id(oldest[1]) < cutoff then
      local old = redis.call('XREVRANGE', stream, fmt(cutoff - 1), '-', 'COUNT', 1)
      floor = math.max(floor, entry_id(old[1]))
    end
  end
  local start = math.max(tonumber(after) + 1, cutoff)
  local flat = {}
  for _, entry in ipairs(redis.call('XRANGE', stream, fmt(start), '+')) do
    local fields = entry[2]
    local data, etype = '', ''
    for j = 1, #fields, 2 do
      if fields[j] == 'd' then data = fields[j + 1] elseif fields[j] == 'e' then etype = fields[j + 1] end
    end
    flat[#flat + 1] = string.gsub(entry[1], '-.*', '')
    flat[#flat + 1] = etype
    flat[#flat + 1] = data
  end
  topics[i] = {fmt(floor), flat}
end
return {fmt(last), fmt(epoch), topics}
