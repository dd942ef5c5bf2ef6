"""Load on `vitlab serve`: 200 predictions from 8 concurrent clients, beside `vitlab predict` on the same image.

    PYTHONPATH=src python benchmarks/serve_load.py RUN [--image PHOTO.jpg] [--requests 200] [--clients 8] [--threads N]

Starts `vitlab serve RUN` as a user does (its own process, 127.0.0.1, a free port), sends the requests with httpx
(one client per thread, the same photo each time) once without and once with the attention overlay the page asks
for, and prints throughput, p50/p95 latency and the error count of each; then, in the same run, the latency of
`vitlab predict`'s function on the same photo (model loaded once) and of the `vitlab predict RUN PHOTO` command
(a new process each time: Python, torch and the model loaded every call). ``--threads N`` sets torch's CPU
threads here and, through OMP_NUM_THREADS, in the server and the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from vitlab import load
from vitlab.api import predict

SHARED_PHOTO = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fruits360-subset" / "Test" / "lemon"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", run, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                sys.exit(f"vitlab serve {run} exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    sys.exit("vitlab serve did not answer within 2 minutes")


def _load(url: str, photo: Path, requests: int, clients: int, attention: str) -> dict:
    """``requests`` POSTs from ``clients`` threads: wall time, per-request latencies (s) and the failures."""
    data = photo.read_bytes()

    def one(client: httpx.Client) -> tuple[float, bool]:
        t0 = time.perf_counter()
        r = client.post(f"{url}/api/predict", files={"image": (photo.name, data)}, data={"attention": attention},
                        timeout=120)
        return time.perf_counter() - t0, r.status_code == 200 and bool(r.json()["results"][0]["top"])

    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def worker(n: int) -> list[tuple[float, bool]]:
        with httpx.Client() as client:
            return [one(client) for _ in range(n)]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        done = [r for rows in pool.map(worker, per_client) for r in rows]
    wall = time.perf_counter() - start
    return {"wall": wall, "latencies": [t for t, _ in done], "errors": sum(not ok for _, ok in done)}


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def _predict_function_ms(run: str, photo: Path, repeats: int) -> list[float]:
    loaded = load(run)
    predict(loaded, [photo])  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(loaded, [photo])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _predict_command_s(run: str, photo: Path, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vitlab", "predict", run, str(photo)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (or any checkpoint vitlab.load reads)")
    parser.add_argument("--image", help="the photo to send (default: a lemon from ../shared/data/fruits360-subset)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30, help="calls of vitlab predict's function (default 30)")
    parser.add_argument("--threads", type=int, help="torch CPU threads, here and in the processes it starts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in the server and command processes
    photo = Path(args.image) if args.image else sorted(SHARED_PHOTO.glob("*.jpg"))[0]
    print(f"machine: {_cpu()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.run}; photo {photo.name}")
    port = _free_port()
    proc = _start(args.run, port)
    try:
        print(f"vitlab serve: {args.requests} requests from {args.clients} concurrent clients (httpx)")
        print(f"{'request':<26}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'errors':>8}")
        for attention in ("none", "png"):
            r = _load(f"http://127.0.0.1:{port}", photo, args.requests, args.clients, attention)
            ms = [t * 1e3 for t in r["latencies"]]
            print(f"{'attention=' + attention:<26}{len(ms) / r['wall']:>8.1f}{statistics.median(ms):>9.1f}"
                  f"{_percentile(ms, 95):>9.1f}{r['errors']:>8d}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    fn = _predict_function_ms(args.run, photo, args.repeats)
    print("vitlab predict, same photo, one at a time:")
    print(f"  the function (model loaded once), {args.repeats} calls: median {statistics.median(fn):.1f} ms, "
          f"p95 {_percentile(fn, 95):.1f} ms")
    cmd = _predict_command_s(args.run, photo, 3)
    print(f"  the command (a new process each call), 3 calls: median {statistics.median(cmd):.2f} s")


if __name__ == "__main__":
    main()
