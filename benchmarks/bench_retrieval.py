"""Retrieval throughput: BM25 in-process vs the same index behind retrieval_server.py on loopback.

    python -m benchmarks.bench_retrieval            (from the repository root)

Queries per second at batch sizes 1 and 64, measured in one run, the four settings interleaved round by round so
machine noise hits them alike; the HTTP/in-process ratio is the protocol's overhead. Then a load test of the server:
--clients concurrent clients, each sending --requests requests of 1, 64 and --max-queries queries (the server's
limit) in turn; requests per second, the 99th percentile latency and the error count (the goal: 0 errors).
"""

import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from envs import DEFAULT_TASK_DIR, BM25Retriever, HttpRetriever

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_TASK_DIR / "corpus.jsonl")
    parser.add_argument("--queries", type=int, default=256, help="queries per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the load test")
    parser.add_argument("--requests", type=int, default=30, help="requests per client in the load test")
    parser.add_argument("--max-queries", type=int, default=1024, help="the server's limit of queries per request")
    args = parser.parse_args()
    questions = [json.loads(line)["question"] for line in (DEFAULT_TASK_DIR / "test.jsonl").read_text().splitlines()]
    queries = (questions * (args.queries // len(questions) + 1))[: args.queries]

    with tempfile.TemporaryDirectory() as cache, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        local = BM25Retriever(args.corpus, cache_dir=cache)
        server = subprocess.Popen([sys.executable, "retrieval_server.py", "--corpus", str(args.corpus), "--port", str(port),
                                   "--cache-dir", cache, "--max-queries", str(args.max_queries)], cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}/retrieve"
            for _ in range(300):
                try:
                    requests.post(url, json={"queries": [], "topk": 3}, timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.2)
            remote = HttpRetriever(url)
            settings = {(name, b): r for name, r in (("in-process", local), ("http", remote)) for b in (1, 64)}
            qps = {key: [] for key in settings}
            for _ in range(args.rounds):
                for (name, batch), retriever in settings.items():
                    start = time.perf_counter()
                    for i in range(0, len(queries), batch):
                        retriever.search(queries[i : i + batch], 3)
                    qps[(name, batch)].append(len(queries) / (time.perf_counter() - start))
            load = load_test(url, questions, args.clients, args.requests, args.max_queries)
        finally:
            server.terminate()
            server.wait(timeout=10)

    print(f"corpus {args.corpus} ({len(local.corpus)} passages), top-3, {args.queries} queries, median of {args.rounds} rounds")
    for batch in (1, 64):
        a, b = statistics.median(qps[("in-process", batch)]), statistics.median(qps[("http", batch)])
        print(f"  batch {batch:3d}: in-process {a:8.0f} q/s   http {b:8.0f} q/s   http / in-process {b / a:.2f}x")
    latencies, errors, seconds = load
    p99 = sorted(latencies)[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"load test: {args.clients} concurrent clients x {args.requests} requests (batches of 1, 64, {args.max_queries} "
          f"queries): {len(latencies) / seconds:.1f} requests/s, p99 latency {1000 * p99:.0f} ms, {errors} errors (goal: 0)")


def load_test(url: str, questions: list[str], clients: int, requests_each: int, max_queries: int) -> tuple[list[float], int, float]:
    """`clients` threads, each with its own connection, send `requests_each` requests of 1, 64 and max_queries
    queries in turn. Returns every request's latency in seconds, the count of failed requests (not a 200 with one
    hit list per query), and the wall time."""
    pool = questions * (max_queries // len(questions) + 2)  # any offset below len(questions) leaves max_queries

    def client(c: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with requests.Session() as session:
            for r in range(requests_each):
                batch = [1, 64, max_queries][(c + r) % 3]
                body = {"queries": pool[(c * 7 + r) % len(questions):][:batch], "topk": 3, "return_scores": True}
                start = time.perf_counter()
                try:
                    answer = session.post(url, json=body, timeout=120)
                    ok = answer.status_code == 200 and len(answer.json()["result"]) == len(body["queries"])
                except (requests.RequestException, ValueError, KeyError):
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok
        return latencies, errors

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as executor:
        results = list(executor.map(client, range(clients)))
    return [x for lat, _ in results for x in lat], sum(e for _, e in results), time.perf_counter() - start


if __name__ == "__main__":
    main()
