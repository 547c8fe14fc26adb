-- Token bucket, checked and updated atomically on the Redis server.
--
-- Time comes from redis.call('TIME'), so every relay instance shares one
-- clock and their clocks' skew cannot inflate the limit. The arithmetic is
-- the same, in the same order, as the in-memory bucket (relay._fast
-- TokenBucket) so both give identical decisions for the same sequence.
--
-- KEYS[1]  bucket hash: tokens (float), ts (seconds, float)
-- ARGV[1]  rate: tokens added per second
-- ARGV[2]  burst: bucket size (a new bucket starts full)
-- ARGV[3]  idle expiry in ms (time to refill completely, plus margin); an
--          expired bucket is exactly a full one, so idle keys can vanish
-- ARGV[4]  optional "now" in seconds, for tests only; empty = server time
--
-- Returns {allowed (1|0), remaining (whole tokens left), retry_after_ms
-- (0 while a whole token is left, -1 if it never refills)}.

local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])

local now
if ARGV[4] ~= nil and ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end

-- A clock that steps back (server time) refills nothing and keeps 'last'.
local elapsed = now - last
if elapsed > 0 then
  tokens = math.min(burst, tokens + elapsed * rate)
  last = now
end

local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end

-- Milliseconds until one whole token, rounded up; -1: never (rate 0).
local retry_after_ms = 0
if tokens < 1 then
  if rate > 0 then
    retry_after_ms = math.ceil((1 - tokens) / rate * 1000)
  else
    retry_after_ms = -1
  end
end

-- %.17g: the floats survive the round trip through a string unchanged.
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', last))
redis.call('PEXPIRE', KEYS[1], ARGV[3])

return {allowed, math.floor(tokens), retry_after_ms}
