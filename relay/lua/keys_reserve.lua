-- Reserve-or-refuse for one virtual key, atomically on the Redis server.
--
-- The same steps, in the same order, as relay/keys/buckets.py decide():
-- lapse expired reservations, refill the rpm/tpm buckets (capacity = the
-- per-minute figure, refilled continuously), refuse on budget, then rpm,
-- then tpm, else take one request and the reserved tokens and hold the
-- reserved cost. Time is the server's (TIME), shared by every instance.
--
-- KEYS (one hash slot: every key is relay:{<key id>}:...)
--   [1] state hash: period spend prompt completion requests rpm_t rpm_ts
--                   tpm_t tpm_ts reserved
--   [2] reservations zset: reservation id -> lapse time (seconds)
--   [3] reservations hash: reservation id -> "cost tokens"
-- ARGV
--   [1] reservation id  [2] tokens  [3] cost (USD)  [4] period start
--   [5] budget (USD, "" = none)  [6] rpm (0 = none)  [7] tpm (0 = none)
--   [8] lease seconds  [9] optional now (tests); "" = server time
--   [10] requests (rpm tokens to take; a process's allowance holds several)
-- Returns {granted (1|0), reason ("" | budget | rpm | tpm), retry_after_ms,
--          rpm_remaining, tpm_remaining, rpm_reset_ms, tpm_reset_ms,
--          committed (USD, as a string)}

local now
if ARGV[9] ~= nil and ARGV[9] ~= '' then
  now = tonumber(ARGV[9])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local rpm = tonumber(ARGV[6])
local tpm = tonumber(ARGV[7])
local requests = tonumber(ARGV[10]) or 1

local s = redis.call('HMGET', KEYS[1], 'period', 'spend', 'rpm_t', 'rpm_ts', 'tpm_t', 'tpm_ts', 'reserved')
local s_period = tonumber(s[1]) or 0
local spend = tonumber(s[2]) or 0
local rpm_t = tonumber(s[3])
local rpm_ts = tonumber(s[4])
local tpm_t = tonumber(s[5])
local tpm_ts = tonumber(s[6])
local reserved = tonumber(s[7]) or 0

local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, rid in ipairs(lapsed) do
  local held = redis.call('HGET', KEYS[3], rid)
  if held then
    reserved = reserved - tonumber(string.match(held, '^(%S+)'))
    redis.call('HDEL', KEYS[3], rid)
  end
  redis.call('ZREM', KEYS[2], rid)
end
-- No reservation left: nothing is held (clears float drift too).
if reserved < 0 or redis.call('ZCARD', KEYS[2]) == 0 then reserved = 0 end
if #lapsed > 0 then
  redis.call('HSET', KEYS[1], 'reserved', string.format('%.17g', reserved))
end

-- A newer period starts from zero; a request stamped with an older one
-- counts against the current period.
if period > s_period then spend = 0 end
local committed = spend + reserved

local function refill(t, ts, cap)
  if t == nil or ts == nil then return cap, now end
  local elapsed = now - ts
  if elapsed > 0 then
    t = math.min(cap, t + elapsed * cap / 60)
    ts = now
  end
  return t, ts
end

local rpm_left, tpm_left, rpm_reset, tpm_reset = -1, -1, 0, 0
if rpm > 0 then
  rpm_t, rpm_ts = refill(rpm_t, rpm_ts, rpm)
  rpm_left = math.max(0, math.floor(rpm_t))
  rpm_reset = math.ceil((rpm - rpm_t) * 60000 / rpm)
end
if tpm > 0 then
  tpm_t, tpm_ts = refill(tpm_t, tpm_ts, tpm)
  tpm_left = math.max(0, math.floor(tpm_t))
  tpm_reset = math.ceil((tpm - tpm_t) * 60000 / tpm)
end
local shown = string.format('%.17g', committed)
local spent = string.format('%.17g', spend)  -- without reservations: a process's outage view starts here

if budget ~= nil and committed + cost > budget + 1e-9 then
  return {0, 'budget', 0, rpm_left, tpm_left, rpm_reset, tpm_reset, shown, spent}
end
if rpm > 0 and rpm_t < requests then
  return {0, 'rpm', math.ceil((math.min(requests, rpm) - rpm_t) * 60000 / rpm), 0, tpm_left, rpm_reset, tpm_reset, shown, spent}
end
if tpm > 0 and tpm_t < tokens then
  local retry
  if tokens > tpm then
    retry = 60000
  else
    retry = math.ceil(math.max(0, tokens - tpm_t) * 60000 / tpm)
  end
  return {0, 'tpm', retry, rpm_left, tpm_left, rpm_reset, tpm_reset, shown, spent}
end

if period > s_period then
  redis.call('HSET', KEYS[1], 'period', period, 'spend', '0')
end
if rpm > 0 then
  rpm_t = rpm_t - requests
  rpm_left = math.max(0, math.floor(rpm_t))
  rpm_reset = math.ceil((rpm - rpm_t) * 60000 / rpm)
  redis.call('HSET', KEYS[1], 'rpm_t', string.format('%.17g', rpm_t), 'rpm_ts', string.format('%.17g', rpm_ts))
end
if tpm > 0 then
  tpm_t = tpm_t - tokens
  tpm_left = math.max(0, math.floor(tpm_t))
  tpm_reset = math.ceil((tpm - tpm_t) * 60000 / tpm)
  redis.call('HSET', KEYS[1], 'tpm_t', string.format('%.17g', tpm_t), 'tpm_ts', string.format('%.17g', tpm_ts))
end
reserved = reserved + cost
redis.call('HSET', KEYS[1], 'reserved', string.format('%.17g', reserved))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[8]), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], string.format('%.17g %d', cost, tokens))
return {1, '', 0, rpm_left, tpm_left, rpm_reset, tpm_reset, string.format('%.17g', committed + cost), spent}
