-- wrk script for bench/run.py.
--
--   wrk -s bench/batch.lua http://127.0.0.1:PORT/multiplex -- multiplex SIZE UPSTREAM_URL [TIMEOUT_MSEC [CHECK]]
--   wrk -s bench/batch.lua http://127.0.0.1:PORT/ -- direct
--
-- "multiplex" POSTs one batch of SIZE requests, all for UPSTREAM_URL, to
-- /multiplex as application/json; "direct" sends wrk's plain GET.  The request
-- is built once in init(), so wrk sends it as a static request.
--
-- With CHECK = 1 (the default), a response() callback counts, for each 2xx
-- batch answer, the outcomes that are not a Success with status 200, and any
-- answer that is not 2xx.  It is a plain substring count, cheap next to the
-- daemon's own cost, and it runs on the load-generator's core.
--
-- done() prints one line, "BENCH_RESULT {json}", for run.py to parse.
-- Latencies are in microseconds, as wrk gives them.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

-- Per-thread state; done() collects it with thread:get().
mode = "direct"
batch_size = 0
checked = 0        -- answers seen by response()
non_2xx = 0        -- answers whose status was not 2xx
bad_batches = 0    -- 2xx answers with at least one outcome not Success/200
failed_subs = 0    -- outcomes not Success/200, over all 2xx answers
sample = ""        -- the first bad answer, cut short

-- How a Success outcome with status 200 looks in Octoplex's compact JSON.
local OK_OUTCOME = '"status":200,"content":'

local function count(haystack, needle)
   local n, pos = 0, 1
   while true do
      local s, e = string.find(haystack, needle, pos, true)
      if not s then
         return n
      end
      n = n + 1
      pos = e + 1
   end
end

local function keep_sample(status, body)
   if sample == "" then
      sample = "HTTP " .. tostring(status) .. ": " .. string.sub(body or "", 1, 600)
   end
end

local function check_response(status, headers, body)
   checked = checked + 1
   if status < 200 or status > 299 then
      non_2xx = non_2xx + 1
      keep_sample(status, body)
      return
   end
   local ok = count(body, OK_OUTCOME)
   if ok ~= batch_size then
      bad_batches = bad_batches + 1
      failed_subs = failed_subs + (batch_size - ok)
      keep_sample(status, body)
   end
end

function init(args)
   mode = args[1] or "direct"
   if mode == "multiplex" then
      batch_size = tonumber(args[2])
      local upstream = args[3]
      local timeout = tonumber(args[4] or "5000")
      local check = (args[5] or "1") == "1"
      local items = {}
      for i = 1, batch_size do
         items[i] = string.format('{"method":"GET","uri":"%s"}', upstream)
      end
      wrk.method = "POST"
      wrk.path = "/multiplex"
      wrk.headers["Content-Type"] = "application/json"
      wrk.body = string.format('{"timeout_msec":%d,"requests":[%s]}',
                               timeout, table.concat(items, ","))
      if check then
         response = check_response
      end
   elseif mode ~= "direct" then
      error("batch.lua: unknown mode " .. tostring(mode))
   end
end

local function json_string(s)
   return '"' .. string.gsub(s, '[%c"\\\128-\255]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end) .. '"'
end

function done(summary, latency, requests)
   local total = { checked = 0, non_2xx = 0, bad_batches = 0, failed_subs = 0 }
   local run_mode, size, first_sample = "direct", 0, ""
   for _, t in ipairs(threads) do
      run_mode = t:get("mode")
      size = t:get("batch_size")
      for name, _ in pairs(total) do
         total[name] = total[name] + t:get(name)
      end
      if first_sample == "" then
         first_sample = t:get("sample")
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"mode":"%s","batch_size":%d,"requests":%d,"duration_us":%d,'
         .. '"bytes":%d,"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"checked":%d,"non_2xx":%d,"bad_batches":%d,"failed_subs":%d,"sample":%s}\n',
      run_mode, size, summary.requests, summary.duration, summary.bytes,
      math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
      math.floor(latency:percentile(99)), latency.mean, latency.max,
      e.connect, e.read, e.write, e.status, e.timeout,
      total.checked, total.non_2xx, total.bad_batches, total.failed_subs,
      json_string(first_sample)))
end
