-- wrk script for `make bench`: POST a JSON body with an Authorization header.
--
-- Environment (set by bench/run.py):
--   BENCH_BODY_FILE  path of the JSON request body (required)
--   BENCH_KEY        API key sent as "Authorization: Bearer <key>" (optional: the baseline
--                    proxy needs none); several, comma-separated: taken in turn, request by
--                    request
--   BENCH_PATH       request path (default /v1/chat/completions)
--
-- wrk's own summary (--latency) gives requests/s, the latency distribution and the
-- "Non-2xx or 3xx responses" count that run.py reads.

local f = assert(io.open(assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE not set"), "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local keys = {}
for key in string.gmatch(os.getenv("BENCH_KEY") or "", "[^,]+") do
  table.insert(keys, key)
end
if #keys == 1 then
  wrk.headers["Authorization"] = "Bearer " .. keys[1]
elseif #keys > 1 then
  local i = 0
  request = function()
    i = i % #keys + 1
    wrk.headers["Authorization"] = "Bearer " .. keys[i]
    return wrk.format()
  end
end
