-- Add one batch of usage totals, exactly once.
--
-- A writer (one relay process) numbers its batches 1, 2, 3... and sends
-- them one at a time, resending the same batch with the same number until
-- it is confirmed. A resend after an ambiguous failure (a timeout after the
-- server had already applied it) finds its number already recorded and
-- changes nothing, so nothing is counted twice and nothing is lost.
--
-- All KEYS share one hash tag (one Redis Cluster slot).
-- KEYS[1] totals hash          field = counter
-- KEYS[2] models hash          field = "<model label>|<counter>"
-- KEYS[3] keys hash            field = "<key hash>|<counter>"
-- KEYS[4] keyset set           the bounded set of key hashes with a row
-- KEYS[5] since string         when counting began
-- KEYS[6] writer sequence      the last batch number applied for this writer
-- ARGV[1] batch number (1, 2, ...)
-- ARGV[2] seconds the writer's sequence is remembered (refreshed per batch)
-- ARGV[3] bound on key hashes (later new ones are added to ARGV[5])
-- ARGV[4] "since" value, set if absent
-- ARGV[5] name of the row past the bound ("other")
-- ARGV[6..] groups of five: kind ("i" HINCRBY | "f" HINCRBYFLOAT),
--          hash (1 totals | 2 models | 3 keys), owner, counter, amount
--
-- Returns 1 when applied, 0 when this batch had been applied before.

local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[6]) or '0')
if seq <= last then
  return 0
end
redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[5], ARGV[4], 'NX')

local max_keys = tonumber(ARGV[3])
local other = ARGV[5]
local slots = {}
for i = 6, #ARGV, 5 do
  local hash = tonumber(ARGV[i + 1])
  local owner = ARGV[i + 2]
  local field = ARGV[i + 3]
  if hash == 2 then
    field = owner .. '|' .. field
  elseif hash == 3 then
    local slot = slots[owner]
    if slot == nil then
      slot = owner
      if owner ~= other and redis.call('SISMEMBER', KEYS[4], owner) == 0 then
        if redis.call('SCARD', KEYS[4]) >= max_keys then
          slot = other
        else
          redis.call('SADD', KEYS[4], owner)
        end
      end
      slots[owner] = slot
    end
    field = slot .. '|' .. field
  end
  if ARGV[i] == 'i' then
    redis.call('HINCRBY', KEYS[hash], field, ARGV[i + 4])
  else
    redis.call('HINCRBYFLOAT', KEYS[hash], field, ARGV[i + 4])
  end
end
return 1
