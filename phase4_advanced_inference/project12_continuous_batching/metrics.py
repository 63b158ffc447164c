"""What a served workload measured: throughput, and the latencies each request felt (TTFT, TPOT).

- throughput: output tokens of every request over the wall time from the first arrival to the last finish.
- TTFT (time to first token): arrival -> first token; queueing plus prefill (Zhong et al. 2024, DistServe).
- TPOT (time per output token): a request's mean gap between its later tokens; what the steps it shares cost.
- TBT (time between tokens): every single gap between two tokens of a request, over all requests; its p99 and
  max show a stall (a long prefill everyone waited for) that a per-request mean (TPOT) spreads thin
  (Agrawal et al. 2024, Sarathi-Serve, measure P99 TBT for this reason).
Percentiles are nearest-rank (p50 = median, p99 = the 99th of 100), over the requests that have the number.
"""

from __future__ import annotations

import math

from phase4_advanced_inference.project12_continuous_batching.request import Request


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile q in [0, 100] of xs (None for no values)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize(requests: list[Request], seconds: float | None = None) -> dict:
    """Throughput and TTFT/TPOT p50/p99 (seconds) of finished requests; `seconds` overrides the wall time."""
    served = [r for r in requests if r.finish_time is not None and r.tokens]
    tokens = sum(len(r.tokens) for r in served)
    if seconds is None:
        seconds = max((r.finish_time for r in served), default=0.0) - min((r.arrival for r in requests), default=0.0)
    ttft = [r.ttft for r in served if r.ttft is not None]
    tpot = [r.tpot for r in served if r.tpot is not None]
    tbt = [b - a for r in served for a, b in zip(r.token_times, r.token_times[1:])]
    return {"requests": len(requests), "served": len(served), "output_tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds if seconds > 0 else 0.0,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
            "tbt_p99": percentile(tbt, 99), "tbt_max": max(tbt, default=None)}


def line(name: str, s: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f} ms"
    return (f"{name}: {s['served']}/{s['requests']} requests, {s['output_tokens']:,} tokens in {s['seconds']:.1f} s "
            f"= {s['tok_s']:.1f} tok/s; TTFT p50 {ms(s['ttft_p50'])} p99 {ms(s['ttft_p99'])}; "
            f"TPOT p50 {ms(s['tpot_p50'])} p99 {ms(s['tpot_p99'])}")
