"""Load test of the intake server over loopback: latency percentiles, throughput, errors and memory.

    .venv/bin/python benchmarks/serve_load.py                 # train (or reuse) a petitions model, run every level
    .venv/bin/python benchmarks/serve_load.py --requests 500  # a quicker run

What it does:
1. trains a model on the real petitions data (../shared/data/petitions/petitions_silver.csv) into
   benchmarks/out/serve_model, or reuses the one already there;
2. starts ``sanshi-ml serve`` in a subprocess and waits for /ready, once per worker count in ``--workers`` (default:
   1 and one per core; the load client shares the cores, so both are worth seeing);
3. drives it from a second process (a small asyncio HTTP/1.1 keep-alive client, cheap enough to leave the cores to
   the server) with a bounded number of requests at each concurrency level: single suggestions at 1, 8 and 32
   concurrent clients, and 32-record batches;
4. prints p50/p95/p99 latency, requests/s, errors and the server's RSS (all worker processes) before and after each
   level. The reference, measured in the same run against the same server, is its trivial ``/health`` endpoint:
   ``ratio`` is requests/s divided by /health's requests/s at the same concurrency, i.e. the share of the bare
   HTTP stack's throughput that is left once the model does its work;
5. (``--maximal``, on by default) keeps maximal batches running (``max_batch`` records of ``max_text_chars``
   characters each, one after the other) and meanwhile measures /health and single suggestions, one client each:
   their p50/p99 against /health's alone in the same run say whether one request can stall the server.

Goals on a 2-core box: single suggestions p99 < 25 ms (1 client), >= 400 req/s with 8 clients, no errors, flat memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SANSHI_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "petitions" / "petitions_silver.csv"
MODEL_DIR = REPO / "benchmarks" / "out" / "serve_model"
TARGETS = {"category": "一级分类", "sanshi": "三事", "unit": "承办单位", "appeal": "诉求类型"}


# ------------------------------------------------------------------------------------------------ the load client


async def _drive(
    host: str, port: int, method: str, path: str, bodies: list[bytes], total: int, concurrency: int
) -> dict:
    """``total`` requests over ``concurrency`` keep-alive connections; latency measured per request."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    counter = iter(range(total))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for number in counter:
                body = bodies[number % len(bodies)] if bodies else b""
                head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
                if method == "POST":
                    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                started = time.perf_counter()
                writer.write(head.encode("ascii") + b"\r\n" + body)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
            failures.append(f"{type(error).__name__}: {error}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"latencies": latencies, "elapsed": elapsed, "statuses": statuses, "failures": failures}


def client_main(args: argparse.Namespace) -> None:
    """The second process: run one level and print its raw figures as JSON."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bodies = [line.rstrip(b"\n") for line in Path(args.bodies).read_bytes().splitlines()] if args.bodies else []
    result = asyncio.run(_drive("127.0.0.1", args.port, args.method, args.path, bodies, args.total, args.concurrency))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- the runner


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_model(model_dir: Path, data: Path) -> Path:
    """Reuse a trained petitions model, or train one (about a minute and a half on 2 cores)."""
    from sanshi_ml.artifacts import read_metadata

    if (model_dir / "metadata.json").exists():
        meta = read_metadata(model_dir)
        print(f"reusing model {model_dir} (sha256 {meta['artifact']['sha256'][:12]}, trained {meta['created_at']})")
        return model_dir
    if not data.exists():
        sys.exit(f"real data not found at {data}; set SANSHI_SHARED_DATA or pass --model-dir to a trained model")
    from sanshi_ml.config import load_params, with_overrides
    from sanshi_ml.stages.train import train

    params = with_overrides(
        load_params(REPO / "params.yaml"),
        {
            "data.columns": {
                "id_col": "留言编号",
                "text_cols": ["留言主题", "留言详情"],
                "time_col": "留言时间",
                "segmented_col": None,
                "targets": TARGETS,
            },
            "split.stratify_target": "category",
            "tracking.enabled": False,
        },
    )
    print(f"training a model on {data} into {model_dir} …")
    started = time.perf_counter()
    train([data], params, model_dir=model_dir, progress=lambda _m: None, track=False)
    print(f"trained in {time.perf_counter() - started:.0f}s")
    return model_dir


def request_bodies(data: Path, n: int, batch: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """Single-record and batch bodies drawn from the real petitions (title + text), as JSON lines."""
    import pandas as pd

    frame = pd.read_csv(data, dtype=str, keep_default_na=False, usecols=["留言编号", "留言主题", "留言详情"])
    rows = frame.sample(n=min(n, len(frame)), random_state=seed)
    records = [
        {"id": i, "title": t, "text": x}
        for i, t, x in zip(rows["留言编号"], rows["留言主题"], rows["留言详情"])
        if x.strip()
    ]
    singles = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
    rng = random.Random(seed)
    batches = [
        json.dumps({"records": rng.sample(records, batch)}, ensure_ascii=False).encode("utf-8") for _ in range(20)
    ]
    return singles, batches


def maximal_batch(data: Path, records: int, chars: int) -> bytes:
    """The largest batch the server accepts: ``records`` real texts, each made ``chars`` characters long by joining
    petitions one after another."""
    import pandas as pd

    texts = [
        t for t in pd.read_csv(data, dtype=str, keep_default_na=False, usecols=["留言详情"])["留言详情"] if t.strip()
    ]
    out, position = [], 0
    for number in range(records):
        text = ""
        while len(text) < chars:
            text += texts[position % len(texts)]
            position += 1
        out.append({"id": f"MAX{number}", "text": text[:chars]})
    return json.dumps({"records": out}, ensure_ascii=False).encode("utf-8")


def server_rss(pid: int) -> float:
    """RSS in MB of the server and its worker processes."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 1e6
    except psutil.NoSuchProcess:
        return float("nan")


def run_level(port: int, method: str, path: str, bodies_file: str | None, total: int, concurrency: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--client",
        "--port",
        str(port),
        "--method",
        method,
        "--path",
        path,
        "--total",
        str(total),
        "--concurrency",
        str(concurrency),
    ]
    if bodies_file:
        cmd += ["--bodies", bodies_file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    raw = json.loads(out.stdout)
    lat = sorted(raw["latencies"])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")

    errors = sum(c for s, c in raw["statuses"].items() if int(s) >= 400) + len(raw["failures"])
    return {
        "n": len(lat),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "rps": len(lat) / raw["elapsed"],
        "max": lat[-1] * 1e3 if lat else float("nan"),
        "errors": errors,
        "failures": raw["failures"][:3],
    }


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    import urllib.error
    import urllib.request

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    sys.exit("server not ready in time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="POST", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/v1/suggest", help=argparse.SUPPRESS)
    parser.add_argument("--bodies", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="trained model (trained here if absent)")
    parser.add_argument("--data", type=Path, default=DATA, help="petitions CSV (for training and request texts)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument(
        "--workers",
        default=f"1,{os.cpu_count() or 1}",
        help="server worker processes, comma-separated: each count gets its own server and run",
    )
    parser.add_argument("--batch", type=int, default=32, help="records per batch request in the batch level")
    parser.add_argument(
        "--maximal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure /health and single suggestions while maximal batches run",
    )
    parser.add_argument(
        "--maximal-requests",
        type=int,
        default=300,
        help="/health and single-suggestion requests measured while maximal batches run",
    )
    args = parser.parse_args(argv)
    if args.client:
        client_main(args)
        return

    model_dir = ensure_model(args.model_dir, args.data)
    singles, batches = request_bodies(args.data, 1000, args.batch)
    work = Path(tempfile.mkdtemp(prefix="sanshi-load-"))
    (work / "singles.jsonl").write_bytes(b"\n".join(singles) + b"\n")
    (work / "batches.jsonl").write_bytes(b"\n".join(batches) + b"\n")
    if args.maximal:
        (work / "maximal.jsonl").write_bytes(maximal_batch(args.data, 256, 20_000) + b"\n")
    levels = [int(c) for c in args.levels.split(",")]
    print(
        f"{os.cpu_count()} cores; {len(singles)} distinct request texts from {args.data.name}; "
        f"{args.requests} requests per level"
    )
    try:
        verdicts = []
        for workers in [int(w) for w in str(args.workers).split(",")]:
            rows = run_server(model_dir, work, workers, levels, args)
            verdicts.append((workers, report(rows, workers, args.batch)))
        for workers, ok in verdicts:
            print(
                f"goals with {workers} worker(s) (p99 < 25 ms at c=1, >= 400 req/s at c=8, no errors, "
                f"RSS growth < 5%, p99 < 300 ms while maximal batches run): {'met' if ok else 'NOT met'}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_server(model_dir: Path, work: Path, workers: int, levels: list[int], args: argparse.Namespace) -> list:
    """Start `sanshi-ml serve` with ``workers`` processes and run every level against it."""
    port = free_port()
    exe = Path(sys.executable).with_name("sanshi-ml")
    cmd = [
        str(exe) if exe.exists() else "sanshi-ml",
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--database-url",
        f"sqlite:///{work / 'feedback.db'}",
    ]
    env = {**os.environ, "SANSHI_API_KEY": "load-test"}
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        load_time = wait_ready(port, server)
        # /ready answers once one worker has loaded; keep asking until every worker has.
        for _ in range(4 * workers):
            run_level(port, "GET", "/ready", None, 20, workers)
        print(f"\nserver with {workers} worker(s) ready in {load_time:.1f}s")
        run_level(port, "POST", "/v1/suggest", str(work / "singles.jsonl"), 200, 4)  # warm every worker
        rows = []
        for concurrency in levels:
            rss_before = server_rss(server.pid)
            ref = run_level(port, "GET", "/health", None, args.requests, concurrency)
            res = run_level(port, "POST", "/v1/suggest", str(work / "singles.jsonl"), args.requests, concurrency)
            rows.append((f"suggest  c={concurrency}", res, ref, rss_before, server_rss(server.pid)))
        rss_before = server_rss(server.pid)
        n_batches = max(20, args.requests // args.batch)
        res = run_level(port, "POST", "/v1/suggest/batch", str(work / "batches.jsonl"), n_batches, 2)
        rows.append((f"batch{args.batch} c=2", res, None, rss_before, server_rss(server.pid)))
        if args.maximal:
            rows += under_maximal_batches(port, work, args.maximal_requests, server.pid)
        return rows
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
        if server.returncode not in (0, -15) and err:
            print(err.decode("utf-8", "replace")[-2000:], file=sys.stderr)


def under_maximal_batches(port: int, work: Path, requests: int, pid: int) -> list:
    """/health and single suggestions (one client each, one after the other) while a second client keeps a maximal
    batch in the server at all times; the reference is /health alone, measured just before."""
    alone = run_level(port, "GET", "/health", None, requests, 1)
    rss_before = server_rss(pid)
    # The batch client runs until it is stopped (far more batches than the measurement needs).
    sender = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--client",
            "--port",
            str(port),
            "--method",
            "POST",
            "--path",
            "/v1/suggest/batch",
            "--bodies",
            str(work / "maximal.jsonl"),
            "--total",
            "1000",
            "--concurrency",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.0)  # the first batch is read, parsed and under way
        health = run_level(port, "GET", "/health", None, requests, 1)
        single = run_level(port, "POST", "/v1/suggest", str(work / "singles.jsonl"), requests, 1)
        still_running = sender.poll() is None
    finally:
        sender.terminate()
        sender.wait(timeout=30)
    if not still_running:
        print("   warning: the maximal-batch client stopped before the measurement ended", file=sys.stderr)
    health["alone"] = single["alone"] = alone
    return [
        ("health (max batches)", health, alone, rss_before, server_rss(pid)),
        ("suggest (max batches)", single, alone, rss_before, server_rss(pid)),
    ]


def report(rows: list, workers: int, batch: int) -> bool:
    """Print one server's table; True if the goals are met."""
    print(
        f"{'level':<16}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}"
        f"{'/health':>9}{'ratio':>7}{'errors':>8}   RSS MB (all workers)"
    )
    loaded = [row for row in rows if "alone" in row[1]]
    for name, res, ref, before, after in rows:
        if "alone" in res:
            continue
        ref_rps = f"{ref['rps']:>9.0f}" if ref else f"{'':>9}"
        ratio = f"{res['rps'] / ref['rps']:>7.2f}" if ref else f"{'':>7}"
        print(
            f"{name:<16}{res['n']:>9}{res['p50']:>9.2f}{res['p95']:>9.2f}{res['p99']:>9.2f}{res['rps']:>9.0f}"
            f"{ref_rps}{ratio}{res['errors']:>8}   {before:.0f} → {after:.0f}"
        )
        if res["failures"]:
            print(f"   failures: {res['failures']}")
    batch_row = next(row for row in rows if row[0].startswith("batch"))
    print(f"batch level: {batch_row[1]['rps'] * batch:.0f} records/s in {batch}-record requests")
    if loaded:
        alone = loaded[0][1]["alone"]
        print(
            f"while maximal batches run (256 x 20,000 characters, one after the other), one client each; "
            f"/health alone just before: p50 {alone['p50']:.2f} ms, p99 {alone['p99']:.2f} ms"
        )
        print(
            f"{'level':<24}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p50 ratio':>11}"
            f"{'p99 ratio':>11}{'errors':>8}"
        )
        for name, res, *_ in loaded:
            print(
                f"{name:<24}{res['n']:>9}{res['p50']:>9.2f}{res['p99']:>9.2f}{res['max']:>9.2f}"
                f"{res['p50'] / alone['p50']:>11.1f}{res['p99'] / alone['p99']:>11.1f}{res['errors']:>8}"
            )
    single = {name: res for name, res, *_ in rows}
    one, eight = single.get("suggest  c=1"), single.get("suggest  c=8")
    first_rss, last_rss = rows[0][3], batch_row[4]
    stalls = all(res["p99"] < 300 for _, res, *_ in loaded)
    return bool(
        one
        and eight
        and one["p99"] < 25
        and eight["rps"] >= 400
        and stalls
        and all(r["errors"] == 0 for _, r, *_ in rows)
        and last_rss < 1.05 * first_rss
    )


if __name__ == "__main__":
    main()
