-- Appended to every wrk script by bench/loadgen.py (which fills in the histogram path).
-- At the end of the run: dump wrk's latency histogram ("value_us count" lines) so the harness can undo
-- wrk's coordinated-omission correction, and print one machine-readable summary line.
-- Errors as wrk counts them: status = responses with status >= 400.
done = function(summary, latency, requests)
  local f = assert(io.open("@HISTOGRAM@", "w"))
  for i = 1, #latency do
    local value, count = latency(i)
    f:write(string.format("%d %d\n", value, count))
  end
  f:close()
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
