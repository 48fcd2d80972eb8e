"""Where a `compress` run's time goes: load, profile, solve, reconstruction (prune, fuse, repair)
and evaluation, each with wall, user and system CPU seconds and peak resident memory.

    python bench/compress_split.py [--label NAME] [--record results/compress_split.json] \
        -- COMPRESS FLAGS...

e.g. `nice -n 5 python bench/compress_split.py --label resnet18 -- --model-name resnet18
--dataset fashion-mnist --macs 0.5 --out /tmp/small.pt` measures compress with its defaults
(give --method / --allocation / --workers to measure others). The flags after `--` go to
`intrafusion compress` unchanged, run in this process through the CLI (the same allocator
setting, defaults and errors as the command); without --profile-cache among them the profile
goes to a fresh temporary file, so it is measured.

The phases are the library functions the run passes through, each time going to the innermost
phase open (exclusive time), so they add up to the run:

- load: checkpoint, data set, model, calibration and held-out images;
- evaluation: the test-set measurements of the unpruned and the compressed network;
- profile: the sensitivity profile (each group pruned alone at each rung, its held-out loss);
- solve: the rest of the plan (cost model, the solve and its check against real counts, the
  repair statistics the profile's variants use);
- reconstruction: api.compress after the plan: prune, fuse, repair, restore BatchNorm;
- save: the compressed model, its report and ONNX file;
- other: the rest (tracing the plan back from the widths, argument parsing).

CPU seconds include this process's children (local --workers: live ones read from /proc, ended
ones from the kernel's account); a Ray cluster's processes are not counted. Peak memory is this
process's high-water mark within each phase (reset between phases); `workers_peak_mib` is the
largest finished child's. Compare CPU seconds and the ratios on a shared machine, not wall.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from intrafusion.cli import package_main  # noqa: E402
from intrafusion.storage import atomic_write  # noqa: E402

# (module, function, phase): the functions whose calls are timed, looked up where they are called
PHASES = [
    ("intrafusion.experiments.compress", "open_checkpoint", "load"),
    ("intrafusion.experiments.compress", "load_dataset", "load"),
    ("intrafusion.experiments.compress", "model_from_state", "load"),
    ("intrafusion.experiments.compress", "calibration_batches", "load"),
    ("intrafusion.experiments.compress", "held_out_set", "load"),
    ("intrafusion.experiments.compress", "measure", "evaluation"),
    ("intrafusion.api", "compress", "reconstruction"),
    ("intrafusion.api", "budget_plan", "solve"),
    ("intrafusion.allocation.solve", "measure_profile", "profile"),
    ("intrafusion.experiments.compress", "finetune", "fine-tuning"),
    ("intrafusion.serialize", "save", "save"),
    ("intrafusion.experiments.compress", "export_onnx", "save"),
    ("intrafusion.experiments.compress", "atomic_write", "save"),
]


def _children_cpu() -> tuple[float, float]:
    """(user, system) seconds of this process's live descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14]))
    mine, user, system = {os.getpid()}, 0, 0
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                user, system = user + times[pid][0], system + times[pid][1]
                changed = True
    return user / tick, system / tick


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its children, live or ended."""
    t = os.times()
    live = _children_cpu()
    return t.user + t.children_user + live[0], t.system + t.children_system + live[1]


def _high_water_mib(reset: bool) -> float:
    """This process's peak resident memory (VmHWM) since the last reset, in MiB; reset after."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return kib / 1024


class Timer:
    """Exclusive per-phase wall, user and system seconds and peak memory."""

    def __init__(self):
        self.stack = ["other"]
        self.totals: dict[str, dict] = {}
        self.mark = self._now()
        _high_water_mib(reset=True)

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return (time.perf_counter(), *cpu_times())

    def stop(self) -> None:
        """Account the time since the last phase change to the phase open."""
        self._switch()

    def _switch(self) -> None:
        now = self._now()
        entry = self.totals.setdefault(self.stack[-1], dict(wall=0.0, user=0.0, system=0.0, peak_mib=0.0))
        for key, a, b in zip(("wall", "user", "system"), self.mark, now):
            entry[key] += b - a
        entry["peak_mib"] = max(entry["peak_mib"], _high_water_mib(reset=True))
        self.mark = now

    @contextmanager
    def phase(self, name: str):
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def wrap(self, function, name: str):
        @wraps(function)
        def timed(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return timed

    def install(self) -> None:
        for module, attribute, name in PHASES:
            module = importlib.import_module(module)
            if hasattr(module, attribute):
                setattr(module, attribute, self.wrap(getattr(module, attribute), name))


def table(phases: dict[str, dict]) -> str:
    total = {k: sum(p[k] for p in phases.values()) for k in ("wall", "user", "system")}
    lines = ["| phase | wall s | share | user s | system s | system / CPU | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, p in [*phases.items(), ("total", {**total, "peak_mib": max(p["peak_mib"] for p in phases.values())})]:
        cpu = p["user"] + p["system"]
        lines.append(f"| {name} | {p['wall']:.1f} | {100 * p['wall'] / max(total['wall'], 1e-9):.1f}% "
                     f"| {p['user']:.1f} | {p['system']:.1f} | {100 * p['system'] / max(cpu, 1e-9):.1f}% "
                     f"| {p['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default=None, help="name of this measurement in the record")
    p.add_argument("--record", default=None, help="JSON file to add this measurement to")
    p.add_argument("compress", nargs=argparse.REMAINDER, help="-- then the flags of intrafusion compress")
    args = p.parse_args(argv)
    given = args.compress[1:] if args.compress[:1] == ["--"] else args.compress
    with tempfile.TemporaryDirectory() as folder:
        fresh = [] if "--profile-cache" in given else ["--profile-cache", str(Path(folder) / "profiles.json")]
        flags = [*given, *fresh]
        timer = Timer()
        timer.install()
        start = time.perf_counter()
        code = package_main(["compress", *flags])
        timer.stop()
        wall = time.perf_counter() - start
    if code:
        return code
    out = Path(flags[flags.index("--out") + 1])
    report = json.loads(out.with_suffix(".json").read_text())
    phases = dict(sorted(timer.totals.items(), key=lambda kv: -kv[1]["wall"]))
    result = dict(label=args.label, flags=given,
                  threads=__import__("torch").get_num_threads(), wall=round(wall, 2),
                  phases={k: {m: round(v, 2) for m, v in p.items()} for k, p in phases.items()},
                  workers_peak_mib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
                  accuracy=report["compressed"]["accuracy"],
                  macs=report["compressed"]["macs"] / report["base"]["macs"],
                  sparsities=report["sparsities"])
    print(table(phases))
    print(f"compressed: {100 * result['accuracy']:.2f}% at {100 * result['macs']:.1f}% of the MACs; plan "
          + json.dumps({g: round(s, 4) for g, s in result["sparsities"].items()}))
    if args.record:
        path = Path(args.record)
        record = json.loads(path.read_text()) if path.is_file() else []
        atomic_write(path, (json.dumps([*record, result], indent=1) + "\n").encode(), "run it again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
