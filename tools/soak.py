"""Soak test: N concurrent gradio_client users against a running app, for a set time.

    python tools/soak.py --url http://127.0.0.1:7860/ --clients 16 --seconds 60

Each user loops over a mix of requests (text search, image search, classify, gallery, and
with --write also adding a new image) and the script prints requests, errors and p50/p95
latency per endpoint. It only talks to the URL it is given; point it at your own server.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image


def make_image(folder: Path, seed: int) -> str:
    rng = random.Random(seed)
    noise = Image.effect_noise((96, 72), rng.randint(10, 90))
    tint = Image.new("RGB", noise.size, tuple(rng.randint(0, 255) for _ in range(3)))
    image = Image.blend(noise.convert("RGB"), tint, 0.5)
    path = folder / f"soak_{seed}.jpg"
    image.save(path, format="JPEG", quality=85)
    return str(path)


def user(url: str, index: int, deadline: float, write: bool, folder: Path, latencies, errors, lock):
    rng = random.Random(index)
    query_image = make_image(folder, 10_000 + index)
    counter = 0
    try:
        client = Client(url, verbose=False, download_files=False)  # measure the server, not downloads
    except Exception as exc:
        with lock:
            errors.append(f"connect: {type(exc).__name__}: {exc}")
        return
    while time.monotonic() < deadline:
        kind = rng.choice(["search_text", "search_image", "classify", "gallery"]
                          + (["add_images"] if write else []))
        started = time.perf_counter()
        try:
            if kind == "search_text":
                client.predict(rng.choice(["a cat", "a rocket", "coffee", "a flower"]), 6,
                               api_name="/search_text")
            elif kind == "search_image":
                client.predict(handle_file(query_image), 6, api_name="/search_image")
            elif kind == "classify":
                client.predict(handle_file(query_image), "cat, dog, rocket, coffee", False,
                               api_name="/classify")
            elif kind == "gallery":
                client.predict(1, api_name="/gallery")
            else:
                counter += 1
                client.predict([handle_file(make_image(folder, index * 100_000 + counter))],
                               api_name="/add_images")
            elapsed = time.perf_counter() - started
            with lock:
                latencies[kind].append(elapsed)
        except Exception as exc:  # counted and reported: the point of a soak test
            with lock:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    client.close()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--write", action="store_true", help="also add new images")
    args = parser.parse_args(argv)

    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as folder:
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=user, args=(args.url, i, deadline, args.write, Path(folder),
                                                       latencies, errors, lock))
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    total = sum(len(v) for v in latencies.values())
    print(f"{args.clients} clients, {args.seconds:.0f} s: {total} requests, {len(errors)} errors, "
          f"{total / args.seconds:.1f} requests/s")
    print(f"{'endpoint':<14}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}")
    everything = [x for v in latencies.values() for x in v]
    for kind, values in sorted(latencies.items()) + [("all", everything)]:
        if values:
            print(f"{kind:<14}{len(values):>9}{1000 * percentile(values, 50):>9.0f}"
                  f"{1000 * percentile(values, 95):>9.0f}")
    for error in errors[:10]:
        print("error:", error)
    return 1 if errors or not total else 0


if __name__ == "__main__":
    raise SystemExit(main())
