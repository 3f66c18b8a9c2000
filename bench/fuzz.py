"""Long coverage-guided fuzzing campaigns (atheris/libFuzzer) over the decoders of tests/fuzz/targets.py.

    PYTHONPATH=src python bench/fuzz.py --list
    PYTHONPATH=src python bench/fuzz.py --seconds 60 frame envelope_decrypt session_body
    PYTHONPATH=src python bench/fuzz.py --seconds 30 --all --out /tmp/cipherpost-fuzz
    PYTHONPATH=src python bench/fuzz.py --structure --seconds 120 session_body envelope_accept

Each target runs in its own process (libFuzzer runs once per process), with cipherpost and msgpack
instrumented for coverage, starting from the target's valid inputs. A finding is any exception
other than the decoder's documented error types: the campaign does not stop at the first one, it
saves each crashing input under ``OUT/crashes/TARGET/`` (``.bin`` plus the traceback in ``.txt``),
counts distinct crash sites, and goes on. libFuzzer itself catches hangs (``-timeout``, the input
is saved as ``OUT/crashes/TARGET/timeout-*``) and memory blow-ups (``-rss_limit_mb``). At the end
each target reports the inputs run, executions per second, the corpus that gained coverage, the
crashes, and the slowest input (the 8 slowest seen are re-run and the costliest kept, saved as
``OUT/slowest/TARGET.bin``: one slow call among millions is often the machine, not the input); a
table sums up all targets and ``OUT/summary.json`` keeps the figures. Reproduce a saved input
with ``--replay FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_TAG = "FUZZ-SUMMARY "
DEFAULT_MAX_LEN = 4096
PROGRESS_EVERY_S = 15.0
TOP_SLOWEST = 8


def _import_targets(instrument: bool) -> dict[str, Any]:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "fuzz")]
    if instrument:
        import atheris  # only the campaign needs it

        with atheris.instrument_imports(include=["cipherpost", "msgpack", "targets"]):
            import targets
    else:
        import targets
    return targets.TARGETS  # type: ignore[no-any-return]


class Campaign:
    """The libFuzzer callback for one target: runs inputs, records findings and the slowest input."""

    def __init__(self, name: str, target: Any, seconds: float, out: Path) -> None:
        self.name = name
        self.target = target
        self.deadline = time.monotonic() + seconds
        self.started = time.monotonic()
        self.next_progress = self.started + PROGRESS_EVERY_S
        self.crash_dir = out / "crashes" / name
        self.slowest_path = out / "slowest" / f"{name}.bin"
        self.inputs = 0
        self.crashing_inputs = 0
        self.sites: dict[str, int] = {}
        self.slowest: list[tuple[float, bytes]] = []   # the TOP_SLOWEST slowest seen, re-timed at the end

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        t0 = time.perf_counter()
        try:
            self.target.check(data)
        except Exception as exc:  # a finding: anything the decoder does not document
            self._record(data, exc)
        elapsed = time.perf_counter() - t0
        if len(self.slowest) < TOP_SLOWEST or elapsed > self.slowest[0][0]:
            self.slowest.append((elapsed, bytes(data)))
            self.slowest.sort(key=lambda item: item[0])
            del self.slowest[:-TOP_SLOWEST]
        now = time.monotonic()
        if now >= self.next_progress:
            self.next_progress = now + PROGRESS_EVERY_S
            print(f"[{self.name}] {self.inputs} inputs, {self.inputs / (now - self.started):.0f}/s, "
                  f"{len(self.sites)} crash sites, slowest seen {self.slowest[-1][0] * 1e3:.1f} ms",
                  flush=True)
        if now >= self.deadline:
            self.finish()

    def _record(self, data: bytes, exc: Exception) -> None:
        self.crashing_inputs += 1
        tb = traceback.extract_tb(exc.__traceback__)
        frame = tb[-1] if tb else None
        site = f"{type(exc).__name__} at {frame.filename}:{frame.lineno}" if frame else type(exc).__name__
        if site not in self.sites:
            digest = hashlib.sha1(data).hexdigest()[:16]
            (self.crash_dir / f"{digest}.bin").write_bytes(data)
            (self.crash_dir / f"{digest}.txt").write_text(
                site + "\n\n" + "".join(traceback.format_exception(exc)))
            print(f"[{self.name}] NEW CRASH SITE {site} ({len(data)} bytes) -> {digest}.bin", flush=True)
        self.sites[site] = self.sites.get(site, 0) + 1

    def _retime(self) -> tuple[float, float, bytes]:
        """The slowest input, judged by re-running each of the slowest seen (best of 3): one slow
        call among millions is usually the machine (GC, another process), not the input."""
        worst = (0.0, 0.0, b"")
        for seen, data in self.slowest:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                with contextlib.suppress(Exception):  # already recorded as a finding
                    self.target.check(data)
                best = min(best, time.perf_counter() - t0)
            if best > worst[0]:
                worst = (best, seen, data)
        return worst

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        best, seen, data = self._retime()
        self.slowest_path.write_bytes(data)
        summary = {
            "target": self.name, "seconds": round(elapsed, 1), "inputs": self.inputs,
            "per_second": round(self.inputs / elapsed) if elapsed else 0,
            "crash_sites": self.sites, "crashing_inputs": self.crashing_inputs,
            "slowest_ms": round(best * 1e3, 3), "slowest_seen_ms": round(seen * 1e3, 2),
            "slowest_len": len(data),
            "slowest_file": str(self.slowest_path),
        }
        print(SUMMARY_TAG + json.dumps(summary), flush=True)
        # libFuzzer's own exit path would print a crash report; leave quietly with our figures.
        sys.stdout.flush()
        os._exit(0)


def _structure_mutator(atheris: Any) -> Any:
    """libFuzzer's byte mutations half the time, a msgpack-aware one (tests/fuzz/strategies.py:
    one node replaced, dropped or pushed to an edge value, also inside nested encodings) the other."""
    import random

    from strategies import mutate_structure

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            out = mutate_structure(data, rng)
            if out is not None and len(out) <= max_size:
                return out
        return atheris.Mutate(data, max_size)  # type: ignore[no-any-return]
    return mutate


def run_one(name: str, seconds: float, out: Path, max_len: int | None, structure: bool) -> None:
    """Child process: one atheris campaign."""
    import atheris

    target = _import_targets(instrument=True)[name]
    corpus = out / "corpus" / name
    for d in (corpus, out / "crashes" / name, out / "slowest"):
        d.mkdir(parents=True, exist_ok=True)
    seeds = target.seeds()
    for seed in seeds:
        target.check(seed)   # warm-up (fixtures are built on first use), so "slowest" is the decoder
        (corpus / ("seed-" + hashlib.sha256(seed).hexdigest()[:16])).write_bytes(seed)
    limit = max_len or max(DEFAULT_MAX_LEN, *(len(s) for s in seeds))
    args = [sys.argv[0], str(corpus), f"-max_len={limit}", "-timeout=10", "-rss_limit_mb=2048",
            "-use_value_profile=1", "-print_final_stats=1",
            f"-artifact_prefix={out / 'crashes' / name}/"]
    atheris.Setup(args, Campaign(name, target, seconds, out),
                  custom_mutator=_structure_mutator(atheris) if structure else None)
    atheris.Fuzz()


def replay(path: Path) -> int:
    """Run one saved input through its target (the folder name) without atheris: its outcome and
    its best time of five runs. Exit status 1 if it is a finding (an undocumented exception)."""
    name = path.parent.name if path.parent.name != "slowest" else path.stem
    target = _import_targets(instrument=False)[name]
    data = path.read_bytes()
    target.check(data)  # warm-up: fixtures are built on first use
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        try:
            result = target.run(data)
            outcome = f"decoded: {type(result).__name__}"
        except target.allowed as exc:
            outcome = f"refused with {type(exc).__name__} (documented)"
        except Exception as exc:  # the finding itself: show it
            traceback.print_exception(exc)
            print(f"{name}: FINDING {type(exc).__name__} on {len(data)} bytes")
            return 1
        times.append(time.perf_counter() - t0)
    print(f"{name}: {len(data)} bytes {outcome}, best of 5 in {min(times) * 1e3:.3f} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="target names (see --list)")
    parser.add_argument("--all", action="store_true", help="every target, one after the other")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "cipherpost-fuzz")
    parser.add_argument("--max-len", type=int, default=None, help="libFuzzer -max_len (default: "
                        f"{DEFAULT_MAX_LEN} or the largest seed)")
    parser.add_argument("--structure", action="store_true",
                        help="also mutate msgpack structure (one node at a time), not only bytes")
    parser.add_argument("--replay", type=Path, help="run one saved input (OUT/crashes/TARGET/x.bin)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child, args.seconds, args.out, args.max_len, args.structure)
        return 0
    if args.replay:
        return replay(args.replay)
    available = _import_targets(instrument=False)
    if args.list:
        for name, target in available.items():
            print(f"{name:20} raises only {', '.join(e.__name__ for e in target.allowed) or 'nothing'}")
        return 0
    names = list(available) if args.all else args.targets
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        parser.error(f"unknown targets {unknown}" if unknown else "name targets or pass --all")
    results = []
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds),
               "--out", str(args.out)] + (["--max-len", str(args.max_len)] if args.max_len else []) \
            + (["--structure"] if args.structure else [])
        print(f"=== {name}: {args.seconds:.0f} s", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              timeout=args.seconds + 120)
        summary = None
        for line in proc.stdout.splitlines():
            if line.startswith(SUMMARY_TAG):
                summary = json.loads(line[len(SUMMARY_TAG):])
            else:
                print("  " + line)
        cov = [ln for ln in proc.stderr.splitlines() if " cov: " in ln]
        if summary is None:  # libFuzzer stopped it: a hang (-timeout), a memory blow-up, a signal
            tail = "\n".join(proc.stderr.splitlines()[-15:])
            print(f"  libFuzzer stopped the campaign (exit {proc.returncode}):\n{tail}")
            summary = {"target": name, "stopped_by_libfuzzer": proc.returncode}
        summary["libfuzzer_last_status"] = cov[-1].strip() if cov else None
        results.append(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'target':20} {'s':>5} {'inputs':>10} {'/s':>7} {'crash sites':>11} {'slowest ms':>10}"
          f" {'len':>6}  libFuzzer (slowest: best of 3 re-runs of the 8 slowest seen)")
    for r in results:
        print(f"{r['target']:20} {r.get('seconds', 0):5.0f} {r.get('inputs', 0):10}"
              f" {r.get('per_second', 0):7}"
              f" {len(r.get('crash_sites', {})):11} {r.get('slowest_ms', 0):10} {r.get('slowest_len', 0):6}"
              f"  {(r.get('libfuzzer_last_status') or '').split('exec/s')[0][:60]}")
    return 1 if any(r.get("crash_sites") or "stopped_by_libfuzzer" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
