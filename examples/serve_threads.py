"""Serve one model to several threads: a small HTTP text-generation server on the standard
library's ThreadingHTTPServer (one thread per request), all requests sharing one GPT2 object.

    python examples/serve_threads.py          # starts the server, sends 4 requests at once, stops

A GPT2 object may be used by any number of threads for inference (forward without targets,
forward(..., for_backward=False), generate, generate_stream, generate_text): the weights are
only read, every thread has its own activation buffers and every generation its own KV cache.
So there is no lock around the model below, and concurrent requests give exactly the results
they would give one after another.  (Training calls on a shared model are serialized by the
model; do not update the weights while other threads generate.)
"""

import json
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from gpt2s import GPT2

MODEL = GPT2.from_pretrained("demo")      # the bundled demo model, loaded once, shared by every request


class GenerateHandler(BaseHTTPRequestHandler):
    """GET /generate?prompt=...&n=20&seed=1 -> {"prompt": ..., "text": ..., "thread": ...}"""

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path != "/generate":
            self.send_error(404, "try /generate?prompt=...")
            return
        q = urllib.parse.parse_qs(url.query)
        try:
            prompt = q["prompt"][0]
            n = int(q.get("n", ["20"])[0])
            seed = int(q["seed"][0]) if "seed" in q else None
            # the shared model, called from this request's thread, no lock needed
            text = MODEL.generate_text(prompt, n, temperature=0.8, top_k=40, seed=seed)
        except (KeyError, ValueError, TypeError) as e:   # a bad request: say what was wrong
            self.send_error(400, str(e))
            return
        body = json.dumps({"prompt": prompt, "text": text,
                           "thread": threading.current_thread().name}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):   # keep the example's output readable
        pass


def request(base, prompt, seed):
    query = urllib.parse.urlencode({"prompt": prompt, "n": 20, "seed": seed})
    with urllib.request.urlopen(f"{base}/generate?{query}", timeout=300) as r:
        return json.load(r)


# port 0: the OS picks a free port
server = ThreadingHTTPServer(("127.0.0.1", 0), GenerateHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_address[1]}"
print(f"serving {MODEL} at {base}")

jobs = [("ROMEO:", 1), ("JULIET:", 2), ("First Citizen:", 3), ("MENENIUS:", 4)]
t0 = time.perf_counter()
with ThreadPoolExecutor(max_workers=len(jobs)) as pool:       # 4 clients at the same time
    replies = list(pool.map(lambda job: request(base, *job), jobs))
print(f"{len(replies)} concurrent requests answered in {time.perf_counter() - t0:.1f} s")
server.shutdown()

threads = set()
for (prompt, seed), reply in zip(jobs, replies):
    # The same call, made directly and alone, gives the same text: concurrency changed nothing.
    alone = MODEL.generate_text(prompt, 20, temperature=0.8, top_k=40, seed=seed)
    threads.add(reply["thread"])
    print(f"\n[{reply['thread']}] {prompt}{reply['text']!r}")
    print("  same as a call made alone:", reply["text"] == alone)
print(f"\nserver threads used: {len(threads)}")
