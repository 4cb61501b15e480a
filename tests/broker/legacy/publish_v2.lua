-- Herald: publish a batch of events atomically (the Redis-level contract, see README).
--
-- KEYS: none (keys depend on the topics; Herald targets one Redis, not Redis Cluster).
-- ARGV[1]  key prefix, e.g. "herald"
-- ARGV[2]  "" to use Redis's clock (do this), or now in microseconds since the epoch (tests)
-- ARGV[3]  replay size: events kept per topic
-- ARGV[4]  replay ttl, in microseconds
-- ARGV[5]  idempotency key, or "" for none
-- ARGV[6]  n, the number of events; then n triples: topic, event type ("" for none), data
--
-- Returns {0, "id1,id2,..."} for a new publish, or {1, "id1,..."} when the
-- idempotency key was already used (nothing is published again).
--
-- For each event, in order and as one step: take the next id
-- (max(last + 1, now): decimal, seeded from the clock so it never goes back,
-- even after Redis lost the counter), XADD it to the topic's stream with the
-- id as entry id, trim the stream by size and age while recording the
-- largest dropped id (the topic's floor), and PUBLISH it on the topic's
-- channel as "<id>|<type>|<data>".

local prefix = ARGV[1]
local now = tonumber(ARGV[2])
if now == nil then
  -- No clock given: Redis's own. One clock for the whole deployment, so ids
  -- never run ahead of it and a restart that lost the counter resumes above them.
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local maxlen = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local idem = ARGV[5]
local n = tonumber(ARGV[6])

-- (Redis scripts can't share code: the helpers and the epoch set-up below
-- are kept identical in publish.lua and history.lua.)
local function fmt(x) return string.format('%.0f', x) end
local function entry_id(entry) return tonumber((string.gsub(entry[1], '-.*', ''))) end

-- An idempotency record is "<expiry µs>:<ids>"; it counts until its expiry
-- on the publishers' clock (PX only collects it).
local idem_key = prefix .. ':idem:' .. idem
if idem ~= '' then
  local previous = redis.call('GET', idem_key)
  if previous then
    local sep = string.find(previous, ':', 1, true)
    if tonumber(string.sub(previous, 1, sep - 1)) > now then
      -- A write, so that a WAIT after this answer counts the replicas that
      -- have the replication stream up to here, which holds the first publish.
      local left = redis.call('PTTL', idem_key)
      if left > 0 then redis.call('PEXPIRE', idem_key, left) end
      return {1, string.sub(previous, sep + 1)}
    end
  end
end

-- A data set without an epoch is new (first use, or Redis lost its data):
-- nothing before its epoch can be replayed.
local counter_key = prefix .. ':id'
local last = tonumber(redis.call('GET', counter_key) or '0')
local epoch = tonumber(redis.call('GET', prefix .. ':epoch') or '-1')
if epoch < 0 then
  epoch = math.max(last, now)
  redis.call('SET', prefix .. ':epoch', fmt(epoch))
  last = epoch
end

local ttl_ms = math.max(1, math.ceil(ttl / 1000))
local cutoff = now - ttl
local ids = {}
for i = 0, n - 1 do
  local topic = ARGV[7 + 3 * i]
  local etype = ARGV[8 + 3 * i]
  local data = ARGV[9 + 3 * i]
  last = math.max(last + 1, now)
  local id = fmt(last)
  local stream = prefix .. ':s:' .. topic
  local floor_key = prefix .. ':f:' .. topic
  local floor = tonumber(redis.call('GET', floor_key) or '0')
  if redis.call('EXISTS', stream) == 0 then
    -- Whatever the topic had is gone, and all of it was older than the TTL.
    floor = math.max(floor, epoch, cutoff)
  end
  if etype == '' then
    redis.call('XADD', stream, id .. '-0', 'd', data)
  else
    redis.call('XADD', stream, id .. '-0', 'd', data, 'e', etype)
  end
  local len = redis.call('XLEN', stream)
  if len > maxlen then
    local dropped = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - maxlen)
    floor = math.max(floor, entry_id(dropped[#dropped]))
    redis.call('XTRIM', stream, 'MAXLEN', maxlen)
  end
  -- Age: only when the oldest entry is older than the cutoff. (Probing with
  -- XREVRANGE from the cutoff backwards on every publish walked the whole
  -- stream when nothing was that old: most of a publish's cost on a busy
  -- topic, by INFO commandstats.) The oldest entry is one forward step.
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #oldest > 0 and entry_id(oldest[1]) < cutoff then
    local old = redis.call('XREVRANGE', stream, fmt(cutoff - 1), '-', 'COUNT', 1)
    floor = math.max(floor, entry_id(old[1]))
    redis.call('XTRIM', stream, 'MINID', fmt(cutoff))
  end
  redis.call('SET', floor_key, fmt(floor), 'PX', ttl_ms)
  redis.call('PEXPIRE', stream, ttl_ms)
  redis.call('PUBLISH', prefix .. ':c:' .. topic, id .. '|' .. etype .. '|' .. data)
  ids[#ids + 1] = id
end
redis.call('SET', counter_key, fmt(last))

local result = table.concat(ids, ',')
if idem ~= '' then
  redis.call('SET', idem_key, fmt(now + ttl) .. ':' .. result, 'PX', ttl_ms)
end
return {0, result}
