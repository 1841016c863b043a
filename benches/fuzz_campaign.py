"""Long fuzz campaign over the four input parsers (issue 8): the same property functions and strategies as the CI
fuzz tests (tests/fuzz/properties.py), many more examples, fresh random seeds.

    python benches/fuzz_campaign.py --examples 100000 [--parsers safetensors_header,calibration] [--seed 1]
        [--json results.jsonl]

Prints one line per parser: examples run, how many parsed / were refused with the project's own error, seconds, and
the failure (hypothesis' shrunk example and traceback) if the property broke. Exit 1 if any property broke.
Not collected by pytest (not a bench_*.py file); nothing in tests/ or nlsr_fast/ imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_one(name: str, examples: int, seed: int) -> dict[str, object]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from tests.fuzz import properties as P

    strategy, check = P.PARSERS[name]
    counter = P.Counter()

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(strategy())
    def prop(x: object) -> None:
        counter(check(x))

    t0 = time.perf_counter()
    failure = None
    try:
        prop()
    except BaseException as exc:  # noqa: BLE001 - report whatever broke the property, then go on to the next parser
        if isinstance(exc, KeyboardInterrupt):
            raise
        failure = "".join(traceback.format_exception(exc))[-6000:]
    return {"parser": name, "examples": counter.ok + counter.error, "parsed": counter.ok, "refused": counter.error,
            "seconds": round(time.perf_counter() - t0, 1), "seed": seed, "failure": failure}


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz import properties as P

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000, help="examples per parser (default 100000)")
    ap.add_argument("--parsers", default=",".join(P.PARSERS), help=f"comma-separated subset of {list(P.PARSERS)}")
    ap.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed (default: the clock)")
    ap.add_argument("--json", type=Path, help="append one JSON line per parser to this file")
    args = ap.parse_args(argv)
    names = [n for n in args.parsers.split(",") if n]
    unknown = [n for n in names if n not in P.PARSERS]
    if unknown:
        ap.error(f"unknown parsers {unknown}; choose from {list(P.PARSERS)}")
    logging.getLogger("nlsr_fast").setLevel(logging.ERROR)  # the parsers' warnings, once per example, are noise here
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="nlsr_fuzz_campaign_", dir=shm)  # a memory file system: many small files
    os.environ["NLSR_FUZZ_TMP"] = tmp
    broke = False
    try:
        for name in names:
            res = run_one(name, args.examples, args.seed)
            broke |= res["failure"] is not None
            print(f"{name}: {res['examples']} examples ({res['parsed']} parsed, {res['refused']} refused with the "
                  f"project's own error) in {res['seconds']} s, seed {res['seed']}: "
                  f"{'PROPERTY BROKE' if res['failure'] else 'no finding'}", flush=True)
            if res["failure"]:
                print(res["failure"], flush=True)
            if args.json:
                with args.json.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(res) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
