"""Benchmark the reward service: sandbox start latency and throughput, math verification rates,
the reward pool on a training-sized table, and the Serve deployment over HTTP.

    python benchmarks/bench_rewards.py                 # print the results section
    python benchmarks/bench_rewards.py --write         # also write benchmarks/rewards_RESULTS_section.md (merge into RESULTS.md)
    python benchmarks/bench_rewards.py --quick         # fewer repetitions, no Ray

Timings are wall-clock medians (and p90) over the repetitions stated in each row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from k15.reward.math import score_math_many
from k15.reward.math_worker import MathVerifier
from k15.reward.sandbox import Limits, Sandbox, SandboxConfig

OUT = Path(__file__).with_name("rewards_RESULTS_section.md")
LIMITS = Limits(cpu_s=2, wall_s=4, memory_mb=512, processes=16)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(x):
    return f"{1000 * x:.1f} ms"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {bwrap}")


# -- sandbox ---------------------------------------------------------------------------------
def bench_sandbox(reps: int) -> list[tuple[str, str]]:
    rows = []
    trivial = ("print(1)", [{"input": ""}])

    # cold: nothing pre-started, the run pays for bwrap + interpreter start, and waits for the exit
    with Sandbox(SandboxConfig(prestart=0, limits=LIMITS)) as sb:
        sb.run(*trivial, wait_exit=True)
        cold = []
        for _ in range(reps):
            t = time.perf_counter()
            r = sb.run(*trivial, wait_exit=True)
            cold.append(time.perf_counter() - t)
            assert r.tests[0].stdout == "1\n", r
        features = sb.features
    rows.append(("start-to-exit, cold (no pre-started container): bwrap + namespaces + Python + run + teardown",
                 f"median {ms(statistics.median(cold))}, p90 {ms(pct(cold, 0.9))} ({reps} runs)"))

    with Sandbox(SandboxConfig(prestart=1, limits=LIMITS)) as sb:
        for label, wait in (("start-to-exit, pre-started container (request to container reaped)", True),
                            ("request to result, pre-started container (teardown off the request path)", False)):
            xs = []
            for _ in range(reps):
                time.sleep(0.1)  # let the spawner have the next container up, as between real requests
                t = time.perf_counter()
                r = sb.run(*trivial, wait_exit=wait)
                xs.append(time.perf_counter() - t)
                assert r.tests[0].stdout == "1\n", r
            rows.append((label, f"median {ms(statistics.median(xs))}, p90 {ms(pct(xs, 0.9))} ({reps} runs)"))

    add = ("a, b = map(int, input().split())\nprint(a + b)",
           [{"input": f"{i} {i + 1}\n"} for i in range(10)])
    for name, (code, tests) in (("trivial program, 1 test", trivial), ("a+b program, 10 tests", add)):
        for conc in (1, 2, 4):
            with Sandbox(SandboxConfig(prestart=conc, limits=LIMITS)) as sb:
                n = reps * 3
                sb.run(code, tests)
                t = time.perf_counter()
                with ThreadPoolExecutor(conc) as ex:
                    outs = list(ex.map(lambda _: sb.run(code, tests), range(n)))
                dt = time.perf_counter() - t
                assert all(len(o.tests) == len(tests) and o.tests[-1].status == "exited" for o in outs)
            extra = f", {n * len(tests) / dt:.0f} tests/s" if len(tests) > 1 else ""
            rows.append((f"throughput, {name}, {conc} in flight (each run a fresh container)",
                         f"{n / dt:.1f} runs/s{extra} ({n} runs)"))
    return rows, features


# -- math ------------------------------------------------------------------------------------
def math_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.choice([2, 3, 4, 5, 6, 8, 10])
        kind = i % 5
        if kind == 0:
            out.append((f"So \\boxed{{\\frac{{{a}}}{{{b}}}}}.", str(a / b) if b in (2, 4, 5, 8, 10) else f"\\frac{{{a}}}{{{b}}}"))
        elif kind == 1:
            out.append((f"The answer is \\boxed{{\\frac{{{2 * a}}}{{{2 * b}}}}}", f"\\frac{{{a}}}{{{b}}}"))
        elif kind == 2:
            out.append((f"\\boxed{{x^2+{2 * a}x+{a * a}}}", f"(x+{a})^2"))
        elif kind == 3:
            out.append((f"\\boxed{{\\sqrt{{{a * a * b}}}}}", f"{a}\\sqrt{{{b}}}"))
        else:
            out.append((f"\\boxed{{{a + 1}/{b}}}", f"\\frac{{{a}}}{{{b}}}"))  # wrong
    return out


def bench_math() -> list[tuple[str, str]]:
    rows = []
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core: us and the worker we start
    ints = [(f" 3+4=7. The answer is \\boxed{{{i}}}.", str(i if i % 3 else i + 1)) for i in range(1000)]
    t = time.perf_counter()
    res = score_math_many(ints, verifier=None)
    dt = time.perf_counter() - t
    assert sum(r.reward for r in res) == sum(1 for i in range(1000) if i % 3)
    rows.append(("1,000 integer answers (built-in task's fast path, in process), one core", f"{dt * 1000:.1f} ms"))

    v = MathVerifier(timeout_s=3.0)
    t = time.perf_counter()
    v.verify("1", "1")
    start = time.perf_counter() - t
    pairs = math_pairs(1000)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        res = score_math_many(pairs, verifier=v)
        times.append(time.perf_counter() - t)
    correct = sum(r.reward for r in res)
    v.close()
    rows.append(("1,000 symbolic answers through math-verify (fractions, radicals, polynomials; 80% "
                 "equivalent), one core, worker already up", f"median {statistics.median(times):.2f} s of 3 "
                 f"({1000 / statistics.median(times):.0f} answers/s; {correct:.0f}/1000 judged equal)"))
    rows.append(("math-verify worker start (import sympy + math-verify)", f"{start:.2f} s"))
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return rows


# -- Ray: pool and Serve ---------------------------------------------------------------------
def bench_ray(reps: int) -> list[tuple[str, str]]:
    import urllib.request

    import ray

    from k15.data.arithmetic import generate_problems, worked_solution
    from k15.models.tokenizer import SHIPPED_DIR, load_tokenizer
    from k15.reward import serve as reward_serve
    from k15.reward.pool import RewardPool
    from k15.schema import segments_to_table

    rows = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tok = load_tokenizer()
    problems = generate_problems(64, seed=0, min_ops=2, max_ops=6, max_value=99)
    recs = []
    for i in range(256):
        p = problems[i % len(problems)]
        ids = tok.encode(worked_solution(p))
        recs.append(dict(sample_id=f"{p.prompt_id}#{i}", prompt_id=p.prompt_id, sample_idx=i, task="math",
                         answer=p.answer, prompt_tokens=tok.encode(p.prompt), response_tokens=ids,
                         logprobs=[0.0] * len(ids), versions=[0] * len(ids), finished=True, finish_reason="eos",
                         length=len(ids), num_segments=1))
    table = segments_to_table(recs)
    pool = RewardPool(2, str(SHIPPED_DIR))
    ray.get(pool.score(table))
    xs = []
    for _ in range(reps):
        t = time.perf_counter()
        out = ray.get(pool.score(ray.put(table)))
        xs.append(time.perf_counter() - t)
    assert sum(out["reward"].to_pylist()) == 256
    rows.append(("RewardPool(2 actors).score: 256 built-in-task samples (decode + verify), Arrow table in and out",
                 f"median {ms(statistics.median(xs))} ({reps} calls)"))

    from ray import serve

    port = 8765
    url = f"http://127.0.0.1:{port}/reward"
    body = json.dumps({"task": "math", "response": "The answer is \\boxed{\\frac{1}{2}}.", "answer": "0.5"}).encode()

    def post(_):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["results"][0]["reward"] == 1.0
        return time.perf_counter() - t0

    def replicas() -> int:
        dep = serve.status().applications["k15-reward"].deployments["k15-reward"]
        return dep.replica_states.get("RUNNING", 0)

    def burst(n: int, label: str) -> None:
        before = replicas()
        t = time.perf_counter()
        with ThreadPoolExecutor(64) as ex:
            lat = list(ex.map(post, range(n)))
        dt = time.perf_counter() - t
        rows.append((f"Serve: {n} requests over HTTP, 64 in flight, {label}",
                     f"{n / dt:.0f} req/s, median latency {ms(statistics.median(lat))}, p90 {ms(pct(lat, 0.9))}, "
                     f"replicas {before} -> {replicas()}"))

    t = time.perf_counter()
    reward_serve.start(port=port, max_ongoing_requests=64, min_replicas=1, max_replicas=1, replica_cpus=0.5)
    up = time.perf_counter() - t
    post(0)
    single = [post(0) for _ in range(50)]
    rows.append(("Serve: deployment up (proxy + 1 replica)", f"{up:.1f} s"))
    rows.append(("Serve: one symbolic math request over HTTP, sequential", f"median {ms(statistics.median(single))}"))
    burst(1000, "1 replica, max_ongoing_requests=64")
    for label, opts in (
        ("1 replica, max_ongoing_requests=5 (Serve's default)", dict(max_ongoing_requests=5, max_replicas=1)),
        ("autoscaling 1..2 replicas (target 8 ongoing, upscale delay 1 s), max_ongoing_requests=64",
         dict(max_ongoing_requests=64, max_replicas=2, target_ongoing_requests=8,
              autoscaling={"upscale_delay_s": 1.0, "downscale_delay_s": 600.0, "metrics_interval_s": 0.5,
                           "look_back_period_s": 2.0})),
    ):
        serve.run(reward_serve.build_app(min_replicas=1, replica_cpus=0.5, **opts), name="k15-reward",
                  route_prefix="/reward")
        post(0)
        burst(3000 if "autoscaling" in label else 1000, label)
    serve.shutdown()
    ray.shutdown()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help=f"write {OUT.name}")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip Ray")
    args = ap.parse_args()
    reps = 10 if args.quick else 50

    load_before = os.getloadavg()[0]
    sandbox_rows, features = bench_sandbox(reps)
    math_rows = bench_math()
    ray_rows = [] if args.quick else bench_ray(10)
    load_after = os.getloadavg()[0]

    cmd = "python benchmarks/bench_rewards.py" + (" --quick" if args.quick else "") + (" --write" if args.write else "")
    lines = [
        "## Rewards: sandbox, math verification, reward pool, Serve",
        "",
        f"Machine: {machine()}. Date: {datetime.date(2026, 11, 22).isoformat()}. "
        f"1-minute load average at the start and end of the run: {load_before:.1f}, {load_after:.1f} "
        f"(the machine is shared; a busy machine makes every row slower).",
        f"Reproduce: `{cmd}` (from the repository root, venv active).",
        f"Sandbox: bubblewrap, user/PID/net/mount/IPC/UTS/cgroup namespaces, seccomp "
        f"{'on' if features['seccomp'] else 'OFF (no libseccomp)'}, host uid {features['host_uid']}, "
        f"interpreter {features['python']}.",
        "",
        "| measurement | result |",
        "|---|---|",
    ]
    lines += [f"| {a} | {b} |" for a, b in sandbox_rows + math_rows + ray_rows]
    lines += [
        "",
        "Targets (issue 5): sandbox start-to-exit for a trivial program <= 40 ms median; >= 15 sandboxed "
        "runs/s on this 2-core machine; 1,000 math verifications <= 5 s on one core.",
        "",
        "Reading the rows: a *pre-started* container has bwrap, the namespaces and the interpreter up and "
        "waits on its stdin (the paper's reused containers); a run takes one, uses it for one program "
        "(all its tests, each in a forked child) and throws it away, while the spawner thread starts "
        "the next. *Cold* pays for all of that inside the request. Throughput rows include starting "
        "every container, since each run gets a fresh one.",
        "",
        "Security and robustness are covered by tests, not timed here: "
        "`pytest -q tests/test_sandbox_security.py` runs 28 hostile programs (network to host loopback, "
        "abstract and path Unix sockets, interfaces, host files, env secrets, /proc snooping, writes "
        "outside, symlink escapes, setuid, fork/thread/memory bombs, CPU spin, sleeping past the wall "
        "limit, huge output, disk filling, one huge file, signals to host processes, ptrace, new user "
        "namespaces, mount/chroot, kernel interfaces, loader tampering, inherited descriptors), each "
        "scored 0 with the host checked afterwards; 9 of them again without seccomp, and 10 control "
        "runs outside the sandbox that must succeed. `pytest -q tests/test_fuzz_rewards.py` sends "
        "10,000 fuzzed responses through each of the math and code verifiers (plus specs, stdin and "
        "reply-stream fuzz) with no exception escaping.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
