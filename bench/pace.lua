-- wrk script: paces one wrk thread's requests to a fixed rate (wrk has no fixed-rate mode and
-- wrk2 is not packaged). Usage: wrk -t1 -cC -dDs -s bench/pace.lua URL -- RATE
--
-- wrk calls delay() before each request after a connection's first (on any connection of the
-- thread); it returns whole milliseconds to wait. The schedule is absolute (request k of the
-- thread is due at start + k / RATE), so the aggregate rate holds whatever the response time,
-- as long as a connection is free. Limits, stated in the report: requests are released in
-- 1 ms batches (wrk's timer granularity), and wrk times a request from its actual send, so a
-- request delayed because every connection was busy is not charged for its wait
-- (coordinated omission). The achieved rate is printed so a variant that fell behind shows.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } nm_timespec;
  int clock_gettime(int clk_id, nm_timespec *tp);
]]
local ts = ffi.new("nm_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms
local next_at

function init(args)
  local rate = tonumber(args[1])
  if rate == nil or rate <= 0 then
    error("pace.lua: give the rate in requests/s after --")
  end
  interval_ms = 1000 / rate
end

function delay()
  local t = now_ms()
  if next_at == nil then
    next_at = t
  end
  next_at = next_at + interval_ms
  local d = next_at - t
  if d < 0 then
    return 0
  end
  return math.floor(d)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "NMPACE requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
