"""Fuzz ModelInfer with 100,000+ hostile requests against a real `salvo serve`, concurrently.

    make bench-fuzz            (or: .venv/bin/python benchmarks/fuzz.py --requests 100000)

Hypothesis builds requests field by field for the demo models (tests/fuzzing.py: each
knows which of its fields are wrong, so its right answer is known), and each is also sent
`--mutations-per-case` times with its bytes mutated by a seeded PRNG (cheaper than a
hypothesis draw; what no longer parses must get INVALID_ARGUMENT). Requests go out
through a generic method with identity serializers, `--concurrency` at a time. At the end:
the status histogram, every answer the oracle calls wrong, whether the server is alive,
what it logged that it should not have, its RSS, and whether it still answers a known
request exactly as before. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, machine, today, write_section  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from salvo_client.proto import grpc_service_pb2 as pb  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    UNEXPECTED_LOG,
    Case,
    Code,
    generic_infer,
    infer_requests,
    mutated,
    random_mutations,
)

MODELS = ("mlp", "digits", "resnet", "mlp_cached")


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid`, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def known_request() -> bytes:
    request = pb.ModelInferRequest(model_name="mlp", id="known")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(bytes(range(256)) * 2)
    return request.SerializeToString()


class Tally:
    """Answers counted by kind and status, and the wrong ones kept (thread-safe)."""

    def __init__(self, concurrency: int) -> None:
        self.statuses: collections.Counter[tuple[str, str]] = collections.Counter()
        self.problems: list[tuple[str, Case]] = []
        self.slots = threading.BoundedSemaphore(concurrency)
        self.lock = threading.Lock()
        self.sent = 0
        self.idle = threading.Condition(self.lock)
        self.pending = 0

    def submit(self, method: grpc.UnaryUnaryMultiCallable, kind: str, case: Case) -> None:
        self.slots.acquire()
        with self.lock:
            self.sent += 1
            self.pending += 1
        future = method.future(case.payload, timeout=120)
        future.add_done_callback(lambda f: self._done(f, kind, case))

    def _done(self, future: grpc.Future, kind: str, case: Case) -> None:
        try:
            code, details, response = Code.OK, "", future.result()
        except grpc.RpcError as exc:
            code, details, response = exc.code(), exc.details() or "", None
        problem = case.problem(code, details, response)
        with self.lock:
            self.statuses[(kind, code.name)] += 1
            if problem is not None:
                self.problems.append((problem, case))
            self.pending -= 1
            self.idle.notify_all()
        self.slots.release()

    def wait(self) -> None:
        with self.idle:
            self.idle.wait_for(lambda: self.pending == 0)


def fuzz(target: str, configs: dict, args: argparse.Namespace, tally: Tally) -> None:
    rng = random.Random(args.seed)
    per_case = 1 + args.mutations_per_case
    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        method = generic_infer(channel)
        round_ = 0
        while tally.sent < args.requests:
            remaining = (args.requests - tally.sent + per_case - 1) // per_case

            @hypothesis_seed(args.seed + round_)
            @settings(
                max_examples=remaining,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(st.data())
            def run(data: st.DataObject) -> None:
                case = data.draw(infer_requests(configs))
                tally.submit(method, "built", case)
                for _ in range(args.mutations_per_case):
                    tally.submit(method, "mutated", mutated(case, random_mutations(rng)))
                if tally.sent and tally.sent % 10_000 < per_case:
                    print(f"  {tally.sent:,} sent", file=sys.stderr, flush=True)

            run()
            round_ += 1
        tally.wait()


def answer(target: str) -> bytes:
    with grpc.insecure_channel(target) as channel:
        response = generic_infer(channel)(known_request(), timeout=30)
    return pb.ModelInferResponse.FromString(response).raw_output_contents[0]


def histogram(statuses: collections.Counter) -> str:
    codes = sorted({code for _, code in statuses})
    rows = [
        "| kind | " + " | ".join(codes) + " | total |",
        "| --- | " + " | ".join("---" for _ in codes) + " | --- |",
    ]
    for kind in ("built", "mutated"):
        counts = [statuses[(kind, code)] for code in codes]
        rows.append(f"| {kind} | " + " | ".join(f"{n:,}" for n in counts) + f" | {sum(counts):,} |")
    totals = [statuses[("built", c)] + statuses[("mutated", c)] for c in codes]
    rows.append("| all | " + " | ".join(f"{n:,}" for n in totals) + f" | {sum(totals):,} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mutations-per-case", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    from salvo.demo import build_demo_repo
    from salvo.domain.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        build_demo_repo(repo)
        # The cache's key and coalescing see hostile requests too.
        shutil.copytree(repo / "mlp", repo / "mlp_cached")
        config = repo / "mlp_cached" / "config.yaml"
        text = config.read_text().replace("name: mlp\n", "name: mlp_cached\n")
        config.write_text(text + "response_cache: {enable: true}\n")
        configs = {name: load_config(repo / name) for name in MODELS}
        with ServerProcess(repo, "--torch-threads", "1") as server:
            before = answer(server.grpc_target)
            rss_start = rss_mib(server.proc.pid)
            load_start = os.getloadavg()
            tally = Tally(args.concurrency)
            started = time.monotonic()
            fuzz(server.grpc_target, configs, args, tally)
            elapsed = time.monotonic() - started
            alive = server.proc.poll() is None
            same = alive and answer(server.grpc_target) == before
            rss_end = rss_mib(server.proc.pid) if alive else 0.0
            logged = [line for line in server.lines if any(word in line for word in UNEXPECTED_LOG)]
    load_end = os.getloadavg()

    answered = sum(tally.statuses.values())
    wrong_status = sum(
        n for (_, code), n in tally.statuses.items() if code in ("UNKNOWN", "INTERNAL")
    )
    table = histogram(tally.statuses)
    verdict = (
        f"{answered:,} requests answered in {elapsed:.0f} s ({answered / elapsed:,.0f}/s); "
        f"UNKNOWN or INTERNAL: {wrong_status}; answers the oracle calls wrong: "
        f"{len(tally.problems)}; server alive afterwards: {'yes' if alive else 'NO'}; "
        f"known request answered as before: {'yes' if same else 'NO'}; unexpected log "
        f"lines: {len(logged)}; server RSS {rss_start:.0f} MiB before, {rss_end:.0f} MiB after."
    )
    print(table)
    print(verdict)
    for problem, case in tally.problems[:20]:
        print(f"WRONG: {problem}\n  faults={case.faults} payload={case.payload[:200].hex()}")
    for line in logged[:10]:
        print("LOGGED:", line.rstrip()[:500])

    if not args.no_write:
        body = f"""
Command: `make bench-fuzz` (`python benchmarks/fuzz.py --requests {args.requests}
--concurrency {args.concurrency} --mutations-per-case {args.mutations_per_case}
--seed {args.seed}`), {today()}.
Machine: {machine()}; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at
the end (a shared machine).
Server: `salvo serve --torch-threads 1` on the demo repository (mlp, digits, resnet) plus
`mlp_cached`, a copy of mlp with the response cache on.
Requests: hypothesis builds each request field by field (model names and versions, hostile
ones included; datatypes; shapes, negative and huge included; raw and typed contents of
right and wrong sizes; parameters of every type; outputs; ids), and each is also sent
{args.mutations_per_case} times with its bytes mutated (flips, inserts, deletes,
truncations, duplicated runs, over-long varints), through a generic method with identity
serializers, {args.concurrency} at a time. The oracle (tests/fuzzing.py) knows the right
answer of each built request: OK with the declared outputs when nothing was made wrong,
NOT_FOUND or INVALID_ARGUMENT for a bad model or version, INVALID_ARGUMENT otherwise;
mutated bytes that no longer parse must get INVALID_ARGUMENT. DEADLINE_EXCEEDED is a right
answer only for a request carrying a short `timeout` parameter (microseconds), which may
expire while it waits in the queue.

{table}

{verdict}
"""
        write_section("Fuzzing ModelInfer", body)
    healthy = alive and same and not logged
    return 0 if healthy and not tally.problems and not wrong_status else 1


if __name__ == "__main__":
    sys.exit(main())
