"""Serve a model over the OpenAI API and call it with the official ``openai`` client.

    pip install "gpt2s[serve]" openai
    python examples/serve_openai.py

Starts ``python -m gpt2s.serve`` with the bundled demo model on a free port, asks 8
completions one at a time, then the same 8 at once from 8 threads (the server decodes them
together in one batch: continuous batching), checks each concurrent answer equals the one
it got alone, streams one more, and stops the server.
"""

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

with socket.socket() as s:          # a free TCP port on this machine
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]

server = subprocess.Popen([sys.executable, "-m", "gpt2s.serve", "--model", "demo",
                           "--served-model-name", "demo", "--port", str(port),
                           "--slots", "8", "--log-level", "warning"])
try:
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):            # wait until the model is loaded and the server listens
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(f"the server exited with status {server.returncode}")
        time.sleep(0.1)

    client = OpenAI(base_url=base + "/v1", api_key="not-needed")
    print("models:", [m.id for m in client.models.list().data])

    prompts = ["First Citizen:", "To be, or not", "Now is the winter", "O Romeo,",
               "Friends, Romans,", "All the world", "The quality of mercy", "If music be"]

    def complete(prompt):
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=24,
                                      temperature=0)
        return r.choices[0].text

    alone = [complete(p) for p in prompts]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:          # 8 clients at once
        together = list(pool.map(complete, prompts))
    print(f"8 concurrent completions in {time.perf_counter() - t0:.2f} s")
    for p, a, b in zip(prompts, alone, together):
        print(f"{p!r} -> {b!r}  same as alone: {a == b}")

    stream = client.completions.create(model="demo", prompt="First Citizen:", max_tokens=24,
                                       temperature=0.8, seed=1, stream=True)
    pieces = []
    for chunk in stream:
        choice = chunk.choices[0]
        pieces.append(choice.text)
        if choice.finish_reason:
            print(f"[streamed] {''.join(pieces)!r} finish_reason={choice.finish_reason}")
finally:
    server.terminate()
    server.wait(30)
