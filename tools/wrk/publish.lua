-- wrk script for the HTTP publish API (tools/bench-http.sh): POST
-- /v1/publish, one message per request (or BATCH per request to
-- /v1/publish/batch), to users u0..u(USERS-1).
-- Environment: CRED (publisher credential), USERS (default 1000),
-- PAYLOAD (bytes, default 100), BATCH (messages per request; with BATCH > 1
-- the path must be /v1/publish/batch and each body holds BATCH messages),
-- ORDER (which user each message goes to):
--   random (default): a user drawn at random for each message, from a
--     generator of each wrk thread's own (seeded by the thread's number);
--   turn: the users in turn. Each wrk thread runs its own copy of this
--     script, so each thread walks the users on its own, over all its
--     connections.
-- herald-publish-bench --order random|turn --groups WRK_THREADS sends the
-- same. The order decides how many client sockets one turn of the node
-- writes to per message: with random users that does not depend on how
-- the load generator's requests line up in time; in turn it does.
local cred = os.getenv("CRED")
local users = tonumber(os.getenv("USERS") or "1000")
local size = tonumber(os.getenv("PAYLOAD") or "100")
local batch = tonumber(os.getenv("BATCH") or "1")
local data = string.rep("x", size)
local order = os.getenv("ORDER") or "random"
assert(order == "random" or order == "turn", "ORDER must be random or turn")
local bodies = {}
local next_user = 0

local function user()
  if order == "random" then
    return math.random(0, users - 1)
  end
  local u = next_user
  next_user = (next_user + 1) % users
  return u
end

local function msg()
  return string.format('{"user":"u%d","data":"%s"}', user(), data)
end

local function gcd(a, b)
  while b ~= 0 do a, b = b, a % b end
  return a
end

-- setup runs in wrk's main script, once per thread, before the thread's
-- own copy runs init.
local threads = 0
function setup(thread)
  thread:set("thread_number", threads)
  threads = threads + 1
end

-- Pre-built bodies, so that wrk's own CPU goes to HTTP, not to Lua. In
-- turn: one whole cycle of the users (USERS / gcd(USERS, BATCH) bodies),
-- so that the sequence runs on without a jump where the bodies wrap
-- around. Random: 64 bodies, different on each thread.
function init(args)
  math.randomseed(1 + (thread_number or 0))
  local count = 64
  if order == "turn" then count = math.floor(users / gcd(users, batch)) end
  for i = 1, count do
    if batch == 1 then
      bodies[i] = msg()
    else
      local ms = {}
      for j = 1, batch do ms[j] = msg() end
      bodies[i] = "[" .. table.concat(ms, ",") .. "]"
    end
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
