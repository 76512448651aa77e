"""Shadow and canary cost: bucketml's predict function with and without a shadow or a canary
beside its current version, measured in one run on this machine with wrk.

    .venv/bin/python bench/rollout_cost.py            # 3 interleaved rounds, 10 s loads, 8 and 64 connections,
                                                      # and 500 and 1,000 req/s at a fixed rate
    .venv/bin/python bench/rollout_cost.py --quick    # a smoke run: 1 round, 3 s loads, 8 connections, 500 req/s

One model, two versions (bench/predict_peers.py's prepare(), run twice into the same bucket:
two trainings of --algorithm on breast_cancer, so the second version costs what the first does
to score), version 1 current. One predict server as it ships (the ASGI function, one uvicorn
worker) pinned to CPU 1, wrk to CPU 0, as predict_peers.py pins them; the server follows the
pointer every --poll-seconds. The pointer is switched with the registry API between these
states, and each measurement starts only once /v2/health/ready reports the state:

    baseline   version 1 alone
    shadow     shadow = version 2: after each unpinned /predict answer is sent, the request is
               queued, and version 2 scores the queued rows in batches on a background thread
               and counts agreement (/metrics; bucketml.serving.comparisons)
    canary     canary = version 2 at --percent (10) %: that share of unpinned requests is
               answered by version 2, and after each such answer version 1 scores the same rows
               the same way (agreement for the monitor)

Every round measures the three states in that order (baseline, shadow, canary, baseline, ...),
--rounds times, so that a drift of the shared machine falls on every state alike; the table
shows per state the median over rounds of wrk's requests/s, p50 and p99 (single-row /predict,
closed loop: each connection sends its next request when its answer arrives), and the ratios of
those medians to the baseline's. The p99 is wrk's, client-observed: the shadow's scoring starts
after the answer is sent, but on the same core, so under wrk's saturating load it takes CPU
from the requests that follow.

Each round also reads /metrics before and after its measured load, to show that the state took
effect: the share of /predict answers from version 2 (the canary's share) and the shadow's
scored rows per answer. It also reads the server's CPU time (/proc) from the start of the
measured load until the server is idle again (the background work included), per answer: the
cost of a state in CPU, which other work on a shared machine disturbs less than the latencies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: common.py and predict_peers.py

from common import machine, versions  # noqa: E402
from predict_peers import (MODEL, ServerFailed, bucketml_server, cpu_seconds, ensure_wrk, first_prediction,  # noqa: E402
                           fmt_load, other_benchmarks, prepare, process_tree, run_wrk, split_cpus, start, stop, wait_idle)

STATES = ["baseline", "shadow", "canary"]


# --------------------------------------------------------------------------- pointer states


def set_state(registry, state: str, other: int, percent: int) -> dict:
    """Write the pointer for `state` with the registry API; returns what /v2/health/ready must show."""
    pointer = registry.current(MODEL)
    if registry.shadow_of(pointer) is not None and state != "shadow":
        registry.end_shadow(MODEL)
    if registry.canary_of(pointer) is not None and state != "canary":
        registry.end_canary(MODEL)
    if state == "shadow":
        registry.start_shadow(MODEL, other)
        return {"shadows": {MODEL: other}}
    if state == "canary":
        registry.start_canary(MODEL, other, percent)
        return {"canaries": {MODEL: {"version": other, "percent": percent}}}
    return {}


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for_state(port: int, stable: int, expected: dict, limit: float = 30.0) -> float:
    """Seconds until /v2/health/ready shows version `stable` current with exactly the expected
    canaries and shadows (and no errors)."""
    began = time.perf_counter()
    seen = None
    while time.perf_counter() - began < limit:
        status, body = get(port, "/v2/health/ready")
        seen = json.loads(body)
        if (status == 200 and seen.get("models", {}).get(MODEL) == stable and "errors" not in seen
                and seen.get("canaries", {}) == expected.get("canaries", {})
                and seen.get("shadows", {}) == expected.get("shadows", {})):
            return time.perf_counter() - began
        time.sleep(0.05)
    raise ServerFailed(f"readiness did not show {expected or 'no canary or shadow'} after {limit:.0f} s: {seen}")


COUNTERS = {"bucketml_predict_requests_total": ("endpoint", "code", "version"), "bucketml_shadow_rows_total": ("version",)}


def counters(port: int) -> dict:
    """{(metric, labels...): value} of the counters that show which state served."""
    status, body = get(port, "/metrics")
    found: dict[tuple, float] = {}
    for line in body.decode().splitlines():
        match = re.match(r"^(\w+)\{(.*)\}\s+([0-9.eE+-]+)$", line)
        if not match or match.group(1) not in COUNTERS:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.get("model") != MODEL:
            continue
        found[(match.group(1), *(labels.get(k) for k in COUNTERS[match.group(1)]))] = float(match.group(3))
    return found


def served_by(before: dict, after: dict) -> dict:
    """What the counters moved by during a load: answers per version, shadow rows."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    answers = {key[3]: value for key, value in delta.items() if key[:3] == ("bucketml_predict_requests_total", "predict", "200")}
    other = sum(value for key, value in delta.items() if key[0] == "bucketml_predict_requests_total"
                and key[:3] != ("bucketml_predict_requests_total", "predict", "200"))
    shadow = sum(value for key, value in delta.items() if key[0] == "bucketml_shadow_rows_total")
    return {"answers": answers, "non_200": other, "shadow_rows": shadow}


def check_label(served: dict, other: int) -> str:
    """One short figure per state: the share answered by the other version, the shadow's rows per answer."""
    total = sum(served["answers"].values())
    if not total:
        return "no answers counted"
    share = served["answers"].get(str(other), 0.0) / total
    text = f"v{other} answered {share:.1%}, shadow rows/answer {served['shadow_rows'] / total:.2f}"
    return text + (f", {served['non_200']:.0f} non-200" if served["non_200"] else "")


# --------------------------------------------------------------------------- open loop


def open_loop(port: int, request, rate: float, seconds: float, cpus: set[int] | None, connections: int = 8) -> dict:
    """A fixed request rate (open loop, as wrk2 does): request i is due at start + i/rate, on
    connection i mod `connections`, and its latency counts from when it was due, so a slow answer
    also delays, and is charged to, the requests queued behind it. The client runs in this
    process's threads, pinned to `cpus` (the CPUs wrk would use) for the run."""
    import threading

    total = int(rate * seconds)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    previous = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)

    def worker(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for i in range(k, total, connections):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            try:
                connection.request("POST", request.path, request.body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if ok:
                mine.append((time.perf_counter() - due) * 1000)
            else:
                with lock:
                    failures[0] += 1
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.sched_setaffinity(0, previous)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def percentile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"rps": len(latencies) / elapsed if elapsed > 0 else None, "p50": percentile(0.50), "p99": percentile(0.99),
            "failed": failures[0]}


# --------------------------------------------------------------------------- report


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def per_round(runs: list[dict], key: str, spec: str) -> str:
    return " ".join("-" if f[key] is None else format(f[key], spec) for f in runs)


def print_table(results: dict, args) -> None:
    head = (f"{'state':<9} {'conns':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'req/s vs base':>13} "
            f"{'p99 vs base':>11} {'CPU ms/ans':>10} {'core busy':>9}  {'p99 per round, ms':<24} {'req/s per round':<22} "
            "check (medians over rounds)")
    print(head)
    for connections in args.connections:
        base = results[("baseline", connections)]
        base_rps, base_p99 = median([f["rps"] for f in base]), median([f["p99"] for f in base])
        for state in STATES:
            runs = results[(state, connections)]
            rps, p50, p99, cpu = (median([f[k] for f in runs]) for k in ("rps", "p50", "p99", "cpu_ms"))
            busy = median([f["cpu_ms"] * f["rps"] / 1000 if f["cpu_ms"] and f["rps"] else None for f in runs])
            failed = sum(f["failed"] for f in runs)
            shares = [f["check_share"] for f in runs if f["check_share"] is not None]
            shadow = [f["check_shadow"] for f in runs if f["check_shadow"] is not None]
            check = (f"v2 answered {median(shares):.1%}, shadow rows/answer {median(shadow):.2f}" if shares else "-")
            if rps is None:
                print(f"{state:<9} {connections:>5} no request completed ({failed} failed)")
                continue
            rps_change = (rps / base_rps - 1) * 100 if base_rps else 0.0
            p99_change = (p99 / base_p99 - 1) * 100 if base_p99 else 0.0
            nan = float("nan")
            print(f"{state:<9} {connections:>5} {rps:>7.0f} {p50:>7.2f} {p99:>7.2f} {rps_change:>+12.1f}% {p99_change:>+10.1f}% "
                  f"{cpu if cpu is not None else nan:>10.3f} {busy if busy is not None else nan:>8.0%}  "
                  f"{per_round(runs, 'p99', '.2f'):<24} {per_round(runs, 'rps', '.0f'):<22} "
                  f"{check}{f', {failed} FAILED' if failed else ''}")


def print_rated(rated: dict, args) -> None:
    if not args.rate:
        return
    print()
    print(f"{'state':<9} {'offered':>8} {'answered/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'p99 vs base':>11}  p99 per round, ms")
    for rate in args.rate:
        base_p99 = median([f["p99"] for f in rated[("baseline", rate)]])
        for state in STATES:
            runs = rated[(state, rate)]
            rps, p50, p99 = (median([f[k] for f in runs]) for k in ("rps", "p50", "p99"))
            failed = sum(f["failed"] for f in runs)
            if p99 is None:
                print(f"{state:<9} {rate:>8g} no request completed ({failed} failed)")
                continue
            change = (p99 / base_p99 - 1) * 100 if base_p99 else 0.0
            print(f"{state:<9} {rate:>8g} {rps:>10.0f} {p50:>7.2f} {p99:>7.2f} {change:>+10.1f}%  "
                  f"{per_round(runs, 'p99', '.2f')}{f', {failed} FAILED' if failed else ''}")
    print("fixed rates: open loop (latency from when each request was due), 8 client threads pinned like wrk; "
          "medians over rounds")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 s loads, 1 s warm-ups, 8 connections")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the three states, medians shown (3; --quick: 1)")
    parser.add_argument("--seconds", type=float, help="seconds of each measured wrk run (10; --quick: 3)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk before each measured run (2; --quick: 1)")
    parser.add_argument("--connections", type=int, nargs="+", help="wrk connections (8 64; --quick: 8)")
    parser.add_argument("--rate", type=float, nargs="*", default=None,
                        help="also measure at these fixed request rates (open loop; default 500 and 1000 req/s, "
                             "--quick 500): below saturation, where an autoscaled service runs")
    parser.add_argument("--percent", type=int, default=10, help="the canary's share of unpinned requests, in %%")
    parser.add_argument("--algorithm", default="random_forest",
                        choices=["logistic_regression", "svm", "gradient_boosting", "random_forest"],
                        help="what both versions are trained with")
    parser.add_argument("--poll-seconds", type=float, default=0.2, help="BUCKETML_POLL_SECONDS of the server")
    parser.add_argument("--server-cpus", default="1",
                        help="CPUs the server is pinned to, comma-separated (wrk gets the others), or 'all'")
    args = parser.parse_args()
    for name, full, quick in (("rounds", 3, 1), ("seconds", 10.0, 3.0), ("warmup", 2.0, 1.0), ("connections", [8, 64], [8]),
                              ("rate", [500.0, 1000.0], [500.0])):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    try:
        cpus, wrk_cpus = split_cpus(args.server_cpus)
    except ValueError as exc:
        parser.error(str(exc))

    wrk = ensure_wrk()
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/rollout_cost.py', *sys.argv[1:]])}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    for other in other_benchmarks():
        if "rollout_cost" not in other:
            print(f"WARNING: another benchmark is running, these figures are contended: {other}")
    print(f"bucketml: {versions(Path(sys.executable), ['functions-framework', 'starlette', 'onnxruntime', 'orjson'])}")
    print(f"wrk:      {subprocess.run([wrk, '-v'], capture_output=True, text=True, check=False).stdout.splitlines()[0]}")
    if cpus:
        print(f"CPU: the server pinned to CPU {','.join(map(str, sorted(cpus)))}, wrk (1 thread) to CPU "
              f"{','.join(map(str, sorted(wrk_cpus)))}, as bench/predict_peers.py pins them")
    else:
        print("CPU: no pinning: the server and wrk (2 threads) share every core")

    from bucketml.registry.model_registry import Registry
    from bucketml.storage import LocalStorage

    with tempfile.TemporaryDirectory(prefix="bucketml-rollout-bench-") as tmp:
        folder = Path(tmp)
        began = time.perf_counter()
        first = prepare(folder, args.algorithm)
        second = prepare(folder, args.algorithm)  # the same bucket: the next version of the same model
        registry = Registry(LocalStorage(first.bucket))
        registry.move_pointer(MODEL, first.version, reason="bench/rollout_cost.py: version 1 current")
        stable, other = first.version, second.version
        print(f"model: breast_cancer, {len(first.rows)} rows x {len(first.columns)} numeric columns; two trainings of "
              f"{args.algorithm} ({json.dumps(first.params)}, {json.dumps(second.params)}) in "
              f"{time.perf_counter() - began:.1f} s: version {stable} current, version {other} the shadow or canary")
        one = first.rows[:1]
        server = bucketml_server(first, "asgi", one, one, with_v2=False)
        shipped = server.command

        def command(port: int):
            argv, env, cwd = shipped(port)
            return argv, {**env, "BUCKETML_POLL_SECONDS": str(args.poll_seconds)}, cwd

        server = replace(server, command=command)
        print(f"server: functions/predict/main.py, {server.shape}, BUCKETML_POLL_SECONDS={args.poll_seconds:g}, "
              "the monitor's figures on (their default flush, 10 s)")
        print(f"requests: single-row /predict (the dataset's first row, unpinned); states: baseline, shadow = v{other}, "
              f"canary = v{other} at {args.percent}%")
        print(f"load: wrk, {args.warmup:g} s warm-up then {args.seconds:g} s measured, at "
              f"{', '.join(map(str, args.connections))} connections, {args.rounds} interleaved round(s)", flush=True)

        results: dict[tuple[str, int], list[dict]] = {(s, c): [] for s in STATES for c in args.connections}
        rated: dict[tuple[str, float], list[dict]] = {(s, r): [] for s in STATES for r in args.rate}
        running = start(server, cpus, folder / "server.log")
        try:
            print(f"first prediction {first_prediction(running, server.single):.2f} s after start", flush=True)
            for round_ in range(1, args.rounds + 1):
                for state in STATES:
                    expected = set_state(registry, state, other, args.percent)
                    took = wait_for_state(running.port, stable, expected)
                    for connections in args.connections:
                        run_wrk(wrk, running.port, server.single, connections, args.warmup, wrk_cpus, folder)  # discarded
                        wait_idle(running.process.pid)
                        before = counters(running.port)
                        pids = process_tree(running.process.pid)
                        cpu_before = cpu_seconds(pids)
                        figures = run_wrk(wrk, running.port, server.single, connections, args.seconds, wrk_cpus, folder)
                        wait_idle(running.process.pid)  # the shadow's and the canary's work left behind
                        cpu = cpu_seconds(pids) - cpu_before
                        served = served_by(before, counters(running.port))
                        total = sum(served["answers"].values())
                        figures["cpu_ms"] = cpu * 1000 / total if total else None
                        figures["check_share"] = served["answers"].get(str(other), 0.0) / total if total else None
                        figures["check_shadow"] = served["shadow_rows"] / total if total else None
                        results[(state, connections)].append(figures)
                        cpu_text = f"{figures['cpu_ms']:.3f}" if figures["cpu_ms"] is not None else "-"
                        print(f"  round {round_} {state:<8} c={connections}: {fmt_load(figures)}; "
                              f"server CPU ms/answer {cpu_text}; {check_label(served, other)} "
                              f"(state shown by readiness after {took:.2f} s)", flush=True)
                    for rate in args.rate:
                        wait_idle(running.process.pid)
                        figures = open_loop(running.port, server.single, rate, args.seconds, wrk_cpus)
                        rated[(state, rate)].append(figures)
                        p99 = f"{figures['p99']:.2f}" if figures["p99"] is not None else "-"
                        print(f"  round {round_} {state:<8} {rate:g} req/s offered: {figures['rps']:.0f} answered/s, "
                              f"p99 {p99} ms, {figures['failed']} failed", flush=True)
            set_state(registry, "baseline", other, args.percent)
        except ServerFailed as exc:
            print(f"cannot run: {exc}", flush=True)
        finally:
            stop(running)
        print()
        print_table(results, args)
        print_rated(rated, args)
        print(f"latencies in ms (wrk, client-observed); medians over {args.rounds} round(s); 'vs base': the state's median "
              f"over the baseline's median at the same connections; check: the share of /predict answers by v{other} and "
              "the shadow's scored rows per answer (/metrics counters over the measured load); CPU ms/ans: the server's CPU "
              "time (user + system) from the start of the measured load until it was idle again, per /predict answer; "
              "core busy: CPU ms/ans x req/s, the share of its core the server used under the load (median over rounds)")
        print(f"load average {os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
