"""Serving throughput: N concurrent streaming clients against ``python -m gpt2s.serve`` and,
when built, llama.cpp's ``llama-server`` (continuous batching over -np slots) on the Q8_0 GGUF
of the same weights.

    python benchmarks/serve_bench.py                       # /tmp/anchors: gpt2-random, int8
    python benchmarks/serve_bench.py --clients 1,8 --rounds 3 --out serve.json
    python benchmarks/serve_bench.py --load 200 --load-clients 16   # the load check

Each client streams one completion of ``--new-tokens`` tokens (end token ignored, greedy)
from a ``--prompt-tokens``-token prompt (token ids, a different text per client so no server
can reuse another client's prompt cache).  Reported per server and client count: aggregate
tokens/s (all tokens / wall time from the first request to the last token), the ratio to one
client, and p50/p95 time to first token.  Both servers run on ``--threads`` threads.

``--load N``: N requests from ``--load-clients`` concurrent clients with random prompt and
output lengths, about 1 in 5 cancelled midway (the stream closed); then every completed
request is sent again alone and must give the same text (greedy), and the server's resident
memory must be back near its level before the load.

The anchors (random GPT-2 124M, its GGUF conversions, llama-server) come from
../shared/peers/setup.sh; --model / --gguf / --llama-server point elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

TEXTS = ["The history of the city begins in the early years of the century, when",
         "In mathematics, a group is a set with an operation that combines any two",
         "Once upon a time there was a small village at the edge of a great forest",
         "The committee met on Tuesday to discuss the budget for the coming year and",
         "Photosynthesis is the process by which green plants and some other organisms",
         "The river flows north through the valley before it turns east toward the sea",
         "Early computers were large machines that filled whole rooms and used vacuum",
         "She opened the letter slowly, unsure whether she wanted to know what it said",
         "A good recipe for bread needs only flour, water, salt and a little patience",
         "The train left the station at dawn, carrying passengers to the northern towns",
         "Jazz developed in the African-American communities of New Orleans in the late",
         "The planet's atmosphere is thick with clouds of sulfuric acid, and its surface",
         "In the spring the garden fills with the colour of tulips and the hum of bees",
         "The old lighthouse keeper kept a diary of every ship that passed the rocks at",
         "Economists disagree about the causes of inflation, but most agree that money",
         "The museum's new wing houses a collection of paintings from the Dutch golden"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ServerProcess:
    def __init__(self, name, cmd, port, env=None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited ({self.proc.returncode}):\n"
                                 f"{self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.close()
                raise SystemExit(f"{name} did not become healthy in 600 s")
            time.sleep(0.2)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts_for(tokenizer, n_clients, n_tokens):
    out = []
    for i in range(n_clients):
        ids = tokenizer.encode(TEXTS[i % len(TEXTS)])
        while len(ids) < n_tokens:
            ids = ids + ids
        out.append(ids[:n_tokens])
    return out


async def stream_one(client, url, model, prompt, max_tokens, cancel_after=None, seed=None):
    """(ttft s, tokens, text, finish_reason) of one streamed completion; cancel_after: close
    the stream after that many chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, chunks, text, finish = None, 0, [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"])
            for c in obj.get("choices", []):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += 1
                text.append(c.get("text") or "")
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
            if cancel_after is not None and chunks >= cancel_after:
                return ttft, chunks, None, "cancelled"
    tokens = max_tokens if finish == "length" else chunks
    return ttft, tokens, "".join(text), finish


async def run_clients(server, model, prompts, new_tokens):
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, server.url, model, p, new_tokens)
                                         for p in prompts))
        wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    ttfts = sorted(r[0] for r in results)
    return {"clients": len(prompts), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def bench_server(server, model, tokenizer, args, counts):
    out = []
    # warm-up: one short request (first-call allocations, page faults of the weights)
    asyncio.run(run_clients(server, model, prompts_for(tokenizer, 1, args.prompt_tokens), 8))
    for n in counts:
        rounds = [asyncio.run(run_clients(server, model,
                                          prompts_for(tokenizer, n, args.prompt_tokens),
                                          args.new_tokens))
                  for _ in range(args.rounds)]
        best = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]   # median
        best["rounds_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in rounds]
        out.append(best)
        print(f"  {server.name:>13}  {n:>2} clients: {best['tokens_per_s']:7.1f} tokens/s "
              f"(rounds {best['rounds_tokens_per_s']}), TTFT p50 "
              f"{1000 * best['ttft_p50_s']:.0f} ms p95 {1000 * best['ttft_p95_s']:.0f} ms",
              flush=True)
    base = out[0]["tokens_per_s"] if out and out[0]["clients"] == 1 else None
    for r in out:
        r["vs_one_client"] = r["tokens_per_s"] / base if base else None
    return out


async def load_test(server, model, tokenizer, args):
    rng = random.Random(args.seed)
    words = " ".join(TEXTS).split()
    jobs = []
    for _ in range(args.load):
        start = rng.randrange(len(words) - 40)
        prompt = " ".join(words[start:start + rng.randint(2, 30)])
        jobs.append((prompt, rng.randint(4, 96), rng.random() < 0.2))
    queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    done, errors, cancelled = [], [], 0
    limits = httpx.Limits(max_connections=args.load_clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            nonlocal cancelled
            while not queue.empty():
                prompt, n, cancel = queue.get_nowait()
                try:
                    r = await stream_one(client, server.url, model, prompt, n,
                                         cancel_after=rng.randint(1, max(1, n - 1))
                                         if cancel else None)
                except Exception as e:   # noqa: BLE001 (counted and reported)
                    errors.append(repr(e))
                    continue
                if r[3] == "cancelled":
                    cancelled += 1
                else:
                    done.append((prompt, n, r[2]))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.load_clients)))
        wall = time.perf_counter() - t0
        # every completed response against the same request alone
        mismatches = 0
        for prompt, n, text in done:
            _, _, alone, _ = await stream_one(client, server.url, model, prompt, n)
            mismatches += alone != text
    return {"requests": len(jobs), "completed": len(done), "cancelled": cancelled,
            "errors": errors[:5], "n_errors": len(errors), "mismatches": mismatches,
            "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", type=Path, default=Path("/tmp/anchors"))
    p.add_argument("--model", type=Path, default=None,
                   help="a checkpoint or a name (demo, gpt2, ...); default: ANCHORS/gpt2-random")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--gguf", type=Path, default=None,
                   help="default: ANCHORS/gguf/gpt2-random-q8_0.gguf")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="default: ANCHORS/llama-build/bin/llama-server (skipped if absent)")
    p.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--load", type=int, default=0, help="run the load check with N requests")
    p.add_argument("--load-clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-gpt2s", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    from harness import announce_machine
    machine = announce_machine()
    model_dir = args.model or args.anchors / "gpt2-random"
    if args.model is not None and not args.model.exists():   # a name: demo, gpt2, ...
        from gpt2s.hub import find_model
        model_dir = find_model(str(args.model))
    gguf = args.gguf or args.anchors / "gguf" / "gpt2-random-q8_0.gguf"
    llama_server = args.llama_server or args.anchors / "llama-build" / "bin" / "llama-server"
    counts = [int(x) for x in args.clients.split(",")]
    if not (Path(model_dir) / "model.safetensors").is_file() and not Path(model_dir).is_file():
        raise SystemExit(f"error: no model at {model_dir} (run ../shared/peers/setup.sh or "
                         f"pass --model)")
    from gpt2s.vocab import tokenizer_for
    import gpt2s
    cfg = gpt2s.AutoModelForCausalLM.from_pretrained(model_dir).config
    tokenizer = tokenizer_for(model_dir, cfg)
    ctx = args.prompt_tokens + args.new_tokens
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = {"cpu": _cpu_name(), "threads": args.threads, "slots": args.slots,
               "dtype": args.dtype, "model": str(model_dir), "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "servers": {}}
    print(f"{results['cpu']}, {args.threads} threads; {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens per client", flush=True)

    if not args.skip_gpt2s:
        port = free_port()
        server = ServerProcess("gpt2s", [sys.executable, "-m", "gpt2s.serve", "--model",
                                         str(model_dir), "--dtype", args.dtype, "--port",
                                         str(port), "--slots", str(args.slots), "--threads",
                                         str(args.threads), "--served-model-name", "bench",
                                         "--max-queue", "1024", "--log-level", "warning"],
                               port, env)
        try:
            results["servers"][f"gpt2s {args.dtype}"] = bench_server(server, "bench",
                                                                     tokenizer, args, counts)
            if args.load:
                before = rss_mb(server.proc.pid)
                load = asyncio.run(load_test(server, "bench", tokenizer, args))
                time.sleep(1.0)
                load.update(rss_before_mb=before, rss_after_mb=rss_mb(server.proc.pid))
                results["load"] = load
                print(f"  load: {load['requests']} requests from {args.load_clients} clients "
                      f"in {load['wall_s']:.1f} s: {load['completed']} completed, "
                      f"{load['cancelled']} cancelled, {load['n_errors']} errors, "
                      f"{load['mismatches']} differ from the request alone; RSS "
                      f"{load['rss_before_mb']:.0f} -> {load['rss_after_mb']:.0f} MB",
                      flush=True)
        finally:
            server.close()

    if llama_server.is_file() and gguf.is_file():
        port = free_port()
        server = ServerProcess("llama-server", [str(llama_server), "-m", str(gguf), "--host",
                                                "127.0.0.1", "--port", str(port), "-np",
                                                str(args.slots), "-cb", "-t", str(args.threads),
                                                "-tb", str(args.threads), "-c",
                                                str(args.slots * max(256, ctx)),
                                                "--no-warmup"], port, env)
        try:
            results["servers"]["llama-server Q8_0"] = bench_server(server, "bench", tokenizer,
                                                                   args, counts)
        finally:
            server.close()
    else:
        print(f"  llama-server skipped: {llama_server if not llama_server.is_file() else gguf} "
              f"not found (../shared/peers/setup.sh builds it)", flush=True)

    ours = results["servers"].get(f"gpt2s {args.dtype}")
    theirs = results["servers"].get("llama-server Q8_0")
    if ours:
        for r in ours:
            if r["vs_one_client"]:
                print(f"gpt2s {r['clients']} clients / 1 client: {r['vs_one_client']:.2f}x")
    if ours and theirs:
        for a, b in zip(ours, theirs):
            print(f"gpt2s / llama-server at {a['clients']} clients: "
                  f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
