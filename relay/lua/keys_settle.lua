-- Replace one reservation of a virtual key by the exact usage, atomically.
--
-- Idempotent: a settlement id is applied once (a marker key with a TTL),
-- so a call retried after a timeout, or merged back after an outage, is
-- never counted twice. The same steps as relay/keys/buckets.py
-- apply_settlement().
--
-- KEYS (one hash slot): [1] state hash  [2] reservations zset
--                       [3] reservations hash  [4] settlement marker
-- ARGV: [1] reservation id ("" = none)  [2] cost (USD)  [3] prompt tokens
--       [4] completion tokens  [5] period start  [6] tpm (0 = none)
--       [7] marker TTL seconds
-- Returns 1 when applied, 0 when it had been applied before.

if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[7])) then
  return 0
end
local prompt = tonumber(ARGV[3])
local completion = tonumber(ARGV[4])
local period = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])

if ARGV[1] ~= '' then
  local held = redis.call('HGET', KEYS[3], ARGV[1])
  if held then
    local held_cost, held_tokens = string.match(held, '^(%S+) (%S+)$')
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0') - tonumber(held_cost)
    if reserved < 0 or redis.call('ZCARD', KEYS[2]) == 0 then reserved = 0 end
    redis.call('HSET', KEYS[1], 'reserved', string.format('%.17g', reserved))
    local tpm_t = tonumber(redis.call('HGET', KEYS[1], 'tpm_t'))
    if tpm > 0 and tpm_t ~= nil then
      tpm_t = math.min(tpm, tpm_t + tonumber(held_tokens) - (prompt + completion))
      redis.call('HSET', KEYS[1], 'tpm_t', string.format('%.17g', tpm_t))
    end
  end
end
local s_period = tonumber(redis.call('HGET', KEYS[1], 'period') or '0')
if s_period ~= period then
  redis.call('HSET', KEYS[1], 'period', period, 'spend', '0')
end
redis.call('HINCRBYFLOAT', KEYS[1], 'spend', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'prompt', prompt)
redis.call('HINCRBY', KEYS[1], 'completion', completion)
redis.call('HINCRBY', KEYS[1], 'requests', 1)
return 1
