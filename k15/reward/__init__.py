"""Rewards: verifiers for model answers, and the services that run them.

    math.py            extract the final answer; exact fast path for plain numbers; math-verify
    math_worker.py     math-verify in a worker process with a per-call timeout and a memory cap
    code.py            tests spec (JSON in the row's `answer`), code extraction, judging
    sandbox.py         bubblewrap containers, pre-started, one per program (+ sandbox_loader.py
                       inside, seccomp.py for the syscall filter)
    testgen.py         test cases for problems without tests (7-of-10 / 9-of-10 rule)
    verifiers.py       the task -> verifier registry and the Scorer that owns the resources
    pool.py            score_table, RewardActor, RewardPool (Ray)
    serve.py           the same service as a Ray Serve deployment over HTTP

Nothing here imports Ray or starts a process at import time.
"""
