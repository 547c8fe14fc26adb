-- POST a chat-completions request with wrk.
--
-- Settings come from the environment (set by benchmarks/loadgen.py):
--   BENCH_BODY     the JSON body; it holds BENCH_MARK once
--   BENCH_MARK     placeholder replaced by a unique string of the same length
--                  in every request when BENCH_VARY=1 (a cache miss each time)
--   BENCH_VARY     "1": vary the body per request; else send it unchanged
--   BENCH_NONCE    8 characters unique to this wrk run (so runs never repeat)
--   BENCH_HEADERS  extra request headers, "Name: value" lines separated by "\n"

local body = os.getenv("BENCH_BODY")
local mark = os.getenv("BENCH_MARK")
local vary = os.getenv("BENCH_VARY") == "1"
local nonce = os.getenv("BENCH_NONCE") or "00000000"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

local at = string.find(body, mark, 1, true)
local prefix = string.sub(body, 1, at - 1)
local suffix = string.sub(body, at + #mark)
-- The unchanged body carries a fixed, valid value in place of the mark.
wrk.body = prefix .. string.rep("0", #mark) .. suffix

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

if vary then
  local counter = 0
  -- nonce (8) + thread (4) + counter (12) = 24 characters, the mark's length.
  function request()
    counter = counter + 1
    local unique = string.format("%s%04d%012d", nonce, thread_id or 0, counter)
    return wrk.format(nil, nil, nil, prefix .. unique .. suffix)
  end
end
