-- Herald: record that events up to an id were lost (a Sentinel failover
-- promoted a replica that had not received them yet).
--
-- ARGV[1] key prefix; ARGV[2] lost: the largest id a node knows was issued
-- (it delivered or published it) but the data set no longer has;
-- ARGV[3] the channel on which every node learns that the epoch moved.
--
-- The data set's epoch rises to `lost`, so a resume from any id below it gets
-- a `reset` (`lost`) instead of a silent hole, and the id counter rises to it,
-- so no lost id is ever issued again. Returns the epoch now in force.

local prefix = ARGV[1]
local lost = tonumber(ARGV[2])
local function fmt(x) return string.format('%.0f', x) end

local epoch = tonumber(redis.call('GET', prefix .. ':epoch') or '-1')
if epoch < lost then
  epoch = lost
  redis.call('SET', prefix .. ':epoch', fmt(epoch))
end
local last = tonumber(redis.call('GET', prefix .. ':id') or '0')
if last < lost then
  redis.call('SET', prefix .. ':id', fmt(lost))
end
redis.call(string.sub(prefix, 1, 1) == '{' and 'SPUBLISH' or 'PUBLISH', ARGV[3], fmt(epoch))
return fmt(epoch)
