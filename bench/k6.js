// Open-loop overlay load for `python -m bench --generator k6` (k6's constant-arrival-rate
// executor starts iterations on schedule whether or not earlier ones returned).
// One console line per request: "<start unix ms>,<latency ms>,<status>,<error code>,<name>".
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';

const paths = new SharedArray('paths', () => JSON.parse(open(__ENV.PATHS)));
const base = __ENV.BASE;
const rate = Number(__ENV.RATE);

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['med', 'p(99)', 'max'],
  scenarios: {
    load: {
      executor: 'constant-arrival-rate',
      rate: rate,
      timeUnit: '1s',
      duration: __ENV.DURATION + 's',
      preAllocatedVUs: Math.max(50, Math.ceil(rate / 10)),
      maxVUs: Math.max(500, rate * 2),
      gracefulStop: __ENV.TIMEOUT + 's',
    },
  },
};

export default function () {
  const i = exec.scenario.iterationInTest;
  if (i >= paths.length) return; // k6 schedules one iteration at the very end: not ours
  const item = paths[i];
  const start = Date.now();
  const res = http.get(base + item[1], { timeout: __ENV.TIMEOUT + 's', tags: { name: item[0] } });
  const t = res.timings;
  const ms = res.status === 0 ? Date.now() - start : t.blocked + t.connecting + t.duration;
  console.log(`${start},${ms.toFixed(3)},${res.status},${res.error_code},${item[0]}`);
}

export function handleSummary(data) {
  const dropped = data.metrics.dropped_iterations ? data.metrics.dropped_iterations.values.count : 0;
  return { [__ENV.SUMMARY]: JSON.stringify({ dropped: dropped }) };
}
