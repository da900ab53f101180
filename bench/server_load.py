"""Server under load: N concurrent openai clients x M requests against `cmc-edge serve` on localhost.

Starts the server as a subprocess (one model, one delta), warms it up, then runs ``--clients``
threads each sending ``--requests`` chat completions (every 4th one streamed). Prints failures,
latency percentiles and the server's resident memory after warm-up, at the half-way mark and at
the end (growth across the run is what matters):

    python bench/server_load.py --bundle runs/<demo>/bundle --model smollm2
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cmc_edge", "serve", "--model", args.model, "--delta", args.bundle,
                               "--port", str(port), "--threads", "2"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        for _ in range(120):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not start")

        def ask(i: int, stream: bool) -> str:
            msgs = [{"role": "user", "content": f"Question {i}: name a colour and an animal."}]
            if stream:
                chunks = client.chat.completions.create(model="m", messages=msgs, max_tokens=args.max_tokens,
                                                        temperature=0.0, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=args.max_tokens, temperature=0.0)
            return r.choices[0].message.content

        for i in range(8):
            ask(i, i % 2 == 0)
        samples = {"after_warmup": rss_mb(server.pid)}
        lat, failures, lock = [], [], threading.Lock()
        total = args.clients * args.requests
        done = [0]

        def client_loop(c: int):
            for k in range(args.requests):
                t0 = time.perf_counter()
                try:
                    ask(c * 1000 + k, k % 4 == 0)
                    ok = None
                except Exception as exc:  # noqa: BLE001 - every failure is counted and printed
                    ok = repr(exc)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    done[0] += 1
                    if ok:
                        failures.append(ok)
                    if done[0] == total // 2:
                        samples["half_way"] = rss_mb(server.pid)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        samples["end"] = rss_mb(server.pid)
        lat.sort()
        report = {"requests": total, "failed": len(failures), "first_failures": failures[:3],
                  "wall_s": round(wall, 1), "requests_per_s": round(total / wall, 2),
                  "latency_s": {"p50": round(statistics.median(lat), 3), "p95": round(lat[int(0.95 * len(lat)) - 1], 3),
                                "max": round(lat[-1], 3)},
                  "server_rss_mb": {k: round(v, 1) for k, v in samples.items()},
                  "rss_growth_mb": round(samples["end"] - samples["after_warmup"], 1)}
        print(json.dumps(report, indent=1))
        return 0 if not failures else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
