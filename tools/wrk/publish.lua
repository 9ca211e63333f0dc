-- wrk script for the HTTP publish API (tools/bench-http.sh): POST
-- /v1/publish, one message per request, to users u0..u(USERS-1) in turn.
-- Environment: CRED (publisher credential), USERS (default 1000),
-- PAYLOAD (bytes, default 100), BATCH (messages per request; with BATCH > 1
-- the path must be /v1/publish/batch and each body holds BATCH messages).
-- Each wrk thread runs its own copy of this script, so each thread walks
-- the users in turn on its own, over all its connections
-- (herald-publish-bench --groups does the same).
local cred = os.getenv("CRED")
local users = tonumber(os.getenv("USERS") or "1000")
local size = tonumber(os.getenv("PAYLOAD") or "100")
local batch = tonumber(os.getenv("BATCH") or "1")
local data = string.rep("x", size)
local bodies = {}
local next_user = 0

local function msg()
  local m = string.format('{"user":"u%d","data":"%s"}', next_user, data)
  next_user = (next_user + 1) % users
  return m
end

local function gcd(a, b)
  while b ~= 0 do a, b = b, a % b end
  return a
end

-- Pre-built bodies, so that wrk's own CPU goes to HTTP, not to Lua: one
-- whole cycle of the users (USERS / gcd(USERS, BATCH) bodies), so that
-- the sequence runs on without a jump where the bodies wrap around.
for i = 1, math.floor(users / gcd(users, batch)) do
  if batch == 1 then
    bodies[i] = msg()
  else
    local ms = {}
    for j = 1, batch do ms[j] = msg() end
    bodies[i] = "[" .. table.concat(ms, ",") .. "]"
  end
end

local n = 0
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. cred
wrk.headers["Content-Type"] = "application/json"

request = function()
  n = n % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[n])
end

done = function(summary, latency, requests)
  io.write(string.format("WRK requests=%d duration_us=%d errors_status=%d batch=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, summary.errors.status, batch,
    latency:percentile(50), latency:percentile(99)))
end
