-- Herald: publish a batch of events atomically (the Redis-level contract, see README).
--
-- KEYS: ignored by the script (it names its keys from ARGV). On a Redis Cluster the caller declares every
-- key it touches (<prefix>:id, :epoch, :idem:<key>, each topic's stream), so Redis routes the call to their
-- slot and refuses it whole (ASK, TRYAGAIN) while that slot migrates, instead of failing half-way.
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
-- id as entry id, and PUBLISH it on the topic's channel as "<id>|<type>|<data>".
--
-- Retention is decided by the reader (history.lua), not paid for here: the
-- replay window is the newest `size` entries younger than the TTL. Memory is
-- bounded by XADD's approximate trim, which keeps at least size + 1 entries
-- (whole radix-tree nodes go, so the entry just before the window is always
-- kept and the reader knows the window's floor exactly), and by the stream's
-- expiry, a TTL after its last publish. The only floor written is a new
-- stream's: whatever the topic had before is gone, all of it older than the
-- TTL or the epoch; it is the stream's own max-deleted-entry-id (XSETID), so
-- it lives and dies with the stream at no cost per publish.
--
-- Cost: a script's price is mostly its redis.call()s (INFO commandstats;
-- make bench's redis-cost scenario measures it against a minimal script), so
-- a publish to an existing stream is one XADD, one PEXPIRE and one PUBLISH,
-- plus TIME, one MGET and one SET per batch.

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
-- A prefix that is a hash tag ("{herald}") names a Redis Cluster deployment: its channels are sharded
-- (SPUBLISH), so an event travels to its shard's nodes only, not over the whole cluster's bus.
local publish = string.sub(prefix, 1, 1) == '{' and 'SPUBLISH' or 'PUBLISH'

-- (Redis scripts can't share code: fmt and the epoch set-up below are kept
-- identical in publish.lua and history.lua.)
local function fmt(x) return string.format('%.0f', x) end

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
local state = redis.call('MGET', counter_key, prefix .. ':epoch')
local last = tonumber(state[1] or '0')
local epoch = tonumber(state[2] or '-1')
if epoch < 0 then
  epoch = math.max(last, now)
  redis.call('SET', prefix .. ':epoch', fmt(epoch))
end
-- Never at or below the epoch, even if the counter alone was lost (a new
-- stream's floor, XSETID's MAXDELETEDID, must stay below its first id).
last = math.max(last, epoch)

local ttl_ms = math.max(1, math.ceil(ttl / 1000))
local keep = maxlen + 1
local ids = {}
for i = 0, n - 1 do
  local topic = ARGV[7 + 3 * i]
  local etype = ARGV[8 + 3 * i]
  local data = ARGV[9 + 3 * i]
  last = math.max(last + 1, now)
  local id = fmt(last)
  local entry = id .. '-0'
  local stream = prefix .. ':s:' .. topic
  local added
  if etype == '' then
    added = redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', keep, entry, 'd', data)
  else
    added = redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', keep, entry, 'd', data, 'e', etype)
  end
  if not added then
    -- A new stream: its floor is everything it could have had before.
    if etype == '' then
      redis.call('XADD', stream, entry, 'd', data)
    else
      redis.call('XADD', stream, entry, 'd', data, 'e', etype)
    end
    redis.call('XSETID', stream, entry, 'MAXDELETEDID', fmt(math.max(epoch, now - ttl)) .. '-0')
  end
  redis.call('PEXPIRE', stream, ttl_ms)
  redis.call(publish, prefix .. ':c:' .. topic, id .. '|' .. etype .. '|' .. data)
  ids[#ids + 1] = id
end
redis.call('SET', counter_key, fmt(last))

local result = table.concat(ids, ',')
if idem ~= '' then
  redis.call('SET', idem_key, fmt(now + ttl) .. ':' .. result, 'PX', ttl_ms)
end
return {0, result}
