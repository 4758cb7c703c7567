#!/usr/bin/env python3
"""Instructions per request of a ferry binary, counted by valgrind's callgrind.

Wall-clock and CPU figures on a shared machine move by 15% from run to run; instruction
counts do not. This runs `ferry serve` under callgrind with the shipped portal-to-lab flow
(as shipped, durable on SQLite, or with `delivery: {mode: sync}`), posts the same Test
Request N times over one connection to it (after a warm-up that is not counted), with a
mock lab answering 201, and prints the instructions ferry executed per request, every thread
included (a durable flow's delivery too). Compare two builds in one sitting:

    python3 benches/instructions.py --mode sync target/release/ferry /tmp/ferry-before

One connection sends one request at a time, so each commit holds one request's writes;
`--connections 32` sends from 32 at once, as under load, where a commit holds several and a
durable flow's worker, falling behind, claims orders from the store instead of taking them
handed over.

Needs valgrind (Debian's package). `--keep` leaves the callgrind profile for
`callgrind_annotate --inclusive=yes`. What the kernel does (sockets, fsync) is not counted.
`--cache` simulates the caches as well and prints the data read, written and missed per
request: copying memory costs far more than its instructions, and shows there.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "bench-key"
WARM_UP = 50


class Lab(BaseHTTPRequestHandler):
    """Takes every order at once, over kept-alive connections."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        order = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        # Each order its own id, as a lab gives: the record of its request gains a key.
        body = json.dumps({"lab_order_id": f"LAB-{order['order_ref']}"}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def project(directory, mode):
    """The shipped schemas and portal-to-lab flow, made synchronous for `sync`."""
    shutil.copytree(os.path.join(REPO, "schemas"), os.path.join(directory, "schemas"))
    os.makedirs(os.path.join(directory, "flows"))
    with open(os.path.join(REPO, "flows/portal-to-lab.yaml")) as f:
        flow = f.read()
    if mode == "sync":
        start, end = flow.index("\ndelivery:"), flow.index("\nreply:")
        flow = flow[:start] + "\ndelivery:\n  mode: sync" + flow[end:]
        # A sync flow keeps no messages to answer a resubmission from: no key to name.
        key = "    idempotency_key: $.body.portal_ref\n"
        assert key in flow
        flow = flow.replace(key, "")
    with open(os.path.join(directory, "flows/portal-to-lab.yaml"), "w") as f:
        f.write(flow)


def delivered(store):
    """How many outbox entries reached the lab."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'").fetchone()[0]


def submit_all(submit, numbers, connections):
    """Submits each of `numbers`, over `connections` connections at once."""
    numbers = list(numbers)
    threads = [
        threading.Thread(target=lambda part=numbers[i::connections]: [submit(n) for n in part])
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def count(binary, mode, requests, keep, connections, cache):
    """Events per request of `binary`, by callgrind's name (`Ir`, instructions, and with
    `cache` the simulated cache's reads, writes and misses)."""
    lab = ThreadingHTTPServer(("127.0.0.1", 0), Lab)
    threading.Thread(target=lab.serve_forever, daemon=True).start()
    directory = tempfile.mkdtemp(prefix="ferry-instructions-")
    project(directory, mode)
    store = os.path.join(directory, "ferry.db")
    profile = os.path.join(directory, "callgrind.out")
    env = dict(
        os.environ,
        LAB_URL=f"http://127.0.0.1:{lab.server_port}",
        PORTAL_API_KEY=KEY,
        RUST_LOG="warn",
    )
    simulated = ["--cache-sim=yes"] if cache else []
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", *simulated, f"--callgrind-out-file={profile}", binary, "serve",
         "--listen", "127.0.0.1:0", "--flows", os.path.join(directory, "flows"),
         "--store", f"sqlite://{store}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in server.stdout:
            found = re.search(r"listening on http://([0-9.]+):(\d+)", line)
            if found:
                host, port = found.group(1), int(found.group(2))
                break
        else:
            sys.exit(f"{binary} did not start")
        threading.Thread(target=lambda: server.stdout.read(), daemon=True).start()
        with open(os.path.join(REPO, "tests/fixtures/payloads/test-request.json")) as f:
            body = f.read()
        local = threading.local()
        failures = []

        def submit(n):
            if not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection(host, port)
            connection = local.connection
            connection.request(
                "POST", "/api/v1/test-requests",
                body.replace("PR-2026-0001", f"PR-INSTR-{n}", 1),
                {"x-api-key": KEY, "content-type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            if response.status not in (200, 202):
                failures.append(f"request {n} was answered {response.status}")

        for n in range(WARM_UP):
            submit(n)
        wait_for_lab(mode, store, WARM_UP)
        control("-z", server.pid)
        submit_all(submit, range(WARM_UP, WARM_UP + requests), connections)
        if failures:
            sys.exit(failures[0])
        wait_for_lab(mode, store, WARM_UP + requests)
        control("-d", server.pid)
    finally:
        server.terminate()
        server.wait()
    # The dump asked for is numbered; the file without a number is what ran after it.
    dumps = [f for f in os.listdir(directory) if f.startswith("callgrind.out.")]
    with open(os.path.join(directory, dumps[0])) as f:
        text = f.read()
    names = re.search(r"^events: (.+)$", text, re.MULTILINE).group(1).split()
    totals = map(int, re.search(r"^summary: (.+)$", text, re.MULTILINE).group(1).split())
    if keep:
        print(f"  profile: {os.path.join(directory, dumps[0])}")
    else:
        shutil.rmtree(directory)
    return {name: total / requests for name, total in zip(names, totals)}


def wait_for_lab(mode, store, total):
    """Until a durable flow has delivered `total` orders (a sync one has, when it answers)."""
    if mode == "sync":
        return
    deadline = time.monotonic() + 300
    while delivered(store) < total:
        if time.monotonic() > deadline:
            sys.exit("the lab did not get every order")
        time.sleep(0.2)


def control(option, pid):
    subprocess.run(["callgrind_control", option, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="*", default=[os.path.join(REPO, "target/release/ferry")])
    parser.add_argument("--mode", choices=["sync", "durable"], default="durable")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--connections", type=int, default=1,
                        help="connections sending at once: under load, a commit holds more writes")
    parser.add_argument("--keep", action="store_true", help="keep each callgrind profile")
    parser.add_argument("--cache", action="store_true",
                        help="simulate the caches too: data read and written, and missed")
    args = parser.parse_args()
    for binary in args.binaries:
        per_request = count(binary, args.mode, args.requests, args.keep, args.connections,
                            args.cache)
        line = f"{binary}: {per_request['Ir']:,.0f} instructions per request ({args.mode})"
        if args.cache:
            line += (
                f"; data reads {per_request['Dr']:,.0f}, writes {per_request['Dw']:,.0f},"
                f" first-level misses {per_request['D1mr'] + per_request['D1mw']:,.0f},"
                f" last-level misses {per_request['DLmr'] + per_request['DLmw']:,.0f}"
            )
        print(line)


if __name__ == "__main__":
    main()
