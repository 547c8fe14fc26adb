-- Replace reservations of a virtual key by the exact usage, atomically.
--
-- One call settles what one relay process's requests of this key used
-- during a short interval (their summed cost and tokens) and releases their
-- reservations. Idempotent: a settlement id is applied once (a marker key
-- with a TTL), so a call retried after a timeout, or merged back after an
-- outage, is never counted twice. The same steps as relay/keys/buckets.py
-- apply_settlement().
--
-- KEYS (one hash slot): [1] state hash  [2] reservations zset
--                       [3] reservations hash  [4] settlement marker
-- ARGV: [1] cost (USD)  [2] prompt tokens  [3] completion tokens
--       [4] requests  [5] period start  [6] tpm (0 = none)
--       [7] marker TTL seconds  [8] rpm (0 = none)  [9] requests reserved
--       but never made (given back to the rpm bucket)
--       [10...] reservation ids to release
-- Returns 1 when applied, 0 when it had been applied before.

if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[7])) then
  return 0
end
local prompt = tonumber(ARGV[2])
local completion = tonumber(ARGV[3])
local period = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])

local held_cost, held_tokens, found = 0, 0, false
for i = 10, #ARGV do
  local held = redis.call('HGET', KEYS[3], ARGV[i])
  if held then
    local c, t = string.match(held, '^(%S+) (%S+)$')
    held_cost = held_cost + tonumber(c)
    held_tokens = held_tokens + tonumber(t)
    found = true
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
if found then
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0') - held_cost
  -- No reservation left: nothing is held (clears float drift too).
  if reserved < 0 or redis.call('ZCARD', KEYS[2]) == 0 then reserved = 0 end
  redis.call('HSET', KEYS[1], 'reserved', string.format('%.17g', reserved))
end
local tpm_t = tonumber(redis.call('HGET', KEYS[1], 'tpm_t'))
if tpm > 0 and tpm_t ~= nil then
  -- Unused reserved tokens go back; tokens used beyond (or without) a
  -- reservation are taken now.
  tpm_t = math.min(tpm, tpm_t + held_tokens - (prompt + completion))
  redis.call('HSET', KEYS[1], 'tpm_t', string.format('%.17g', tpm_t))
end
local rpm = tonumber(ARGV[8])
local refund = tonumber(ARGV[9])
local rpm_t = tonumber(redis.call('HGET', KEYS[1], 'rpm_t'))
if rpm > 0 and refund > 0 and rpm_t ~= nil then
  redis.call('HSET', KEYS[1], 'rpm_t', string.format('%.17g', math.min(rpm, rpm_t + refund)))
end
local s_period = tonumber(redis.call('HGET', KEYS[1], 'period') or '0')
-- Late usage of an older period counts in the current one.
if period > s_period then
  redis.call('HSET', KEYS[1], 'period', period, 'spend', '0')
end
redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'prompt', prompt)
redis.call('HINCRBY', KEYS[1], 'completion', completion)
redis.call('HINCRBY', KEYS[1], 'requests', tonumber(ARGV[4]))
return 1
