-- The skewed mix: a small share of requests go to /slow/<ms> (the server awaits asyncio.sleep(ms)),
-- the rest to the hello page. Arguments (after `--`): share (default 0.02), min ms (50), max ms (100).
-- The sequence is pre-generated from a fixed seed, so every system sees the same mix in the same order.
local reqs, n, i = {}, 4096, 0

init = function(args)
  local share = tonumber(args[1]) or 0.02
  local lo, hi = tonumber(args[2]) or 50, tonumber(args[3]) or 100
  math.randomseed(12345)
  for k = 1, n do
    if math.random() < share then
      reqs[k] = wrk.format("GET", "/slow/" .. math.random(lo, hi))
    else
      reqs[k] = wrk.format("GET", "/")
    end
  end
end

request = function()
  i = i % n + 1
  return reqs[i]
end
