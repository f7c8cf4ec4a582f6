"""The campaign's summary (scripts/gpu_check.sh): at most 80 lines that tell the story of a GPU run.

    python scripts/gpu_summary.py WORK_DIR [--out summary.txt] [--total 540] [--stages "install ceilings ..."]

Reads what the stages left in the work folder (whatever exists: a stage cut off or never reached is
reported as such): env.txt, stages.tsv, ceilings.csv, coldstart.csv, precompile.json, tests_*.xml (JUnit)
and tests_*.log, e2e.csv, e2e_compile.csv, infinity.csv, the kernel benchmarks' CSVs and tiles.csv. Also
writes WORK_DIR/verdict.txt (``stages_failed=N tests_failed=M``) for scripts and CI.
"""
import argparse
import csv
import glob
import json
import os
import statistics
import sys
import xml.etree.ElementTree as ET

MAX_LINES = 80
MAX_FAILURES = 18


def _csv(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def stages(work):
    rows = []
    try:
        with open(os.path.join(work, "stages.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    rows.append(parts)
    except OSError:
        pass
    return rows


def tests(work):
    """Counts over every JUnit file, the failures by name, and the groups killed by their timeout."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    for path in sorted(glob.glob(os.path.join(work, "tests_*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError):
            failures.append((os.path.basename(path), "unreadable JUnit file (group killed mid-write?)"))
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds or "error" in kinds:
                child = case.find("failure") if "failure" in kinds else case.find("error")
                counts["failed" if "failure" in kinds else "errors"] += 1
                msg = (child.get("message") or child.text or "").strip().splitlines()
                failures.append((name, msg[0][:110] if msg else ""))
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    killed = []
    for path in sorted(glob.glob(os.path.join(work, "tests_*.log"))):
        with open(path, errors="replace") as f:
            text = f.read()
        if "killed by its timeout" in text or "no time left" in text:
            killed.append(os.path.basename(path)[:-4])
    return counts, failures, killed


def e2e_lines(rows, baseline, provider="fastvar"):
    """One line per (model, batch): ``provider``'s whole-sample time against ``baseline``'s (the provider the
    ``speedup_vs_eager`` column divides by), and the floors. Per-scale rows (``scale`` set) are left out."""
    out = []
    by = {}
    for r in rows:
        if not r.get("scale"):
            by.setdefault((r.get("model"), r.get("batch")), {})[r.get("provider")] = r
    for (model, batch), prov in sorted(by.items(), key=lambda kv: (kv[0][0] or "", int(kv[0][1] or 0))):
        fast, base = prov.get(provider), prov.get(baseline)
        if fast is None:
            continue
        line = f"  {model} B={batch}: {provider} {fast.get('ms')} ms"
        if fast.get("images_per_s"):
            line += f" ({fast['images_per_s']} img/s)"
        if base is not None:
            line += f", {baseline} {base.get('ms')} ms: x{fast.get('speedup_vs_eager')}"
        floors = [f"{what} {fast[col]} ms" for what, col in (("FLOPs", "flop_floor_ms"), ("weights", "weight_floor_ms"))
                  if fast.get(col)]
        if floors:
            line += ", floors: " + ", ".join(floors)
        if fast.get("over_floor"):
            line += f" ({fast['over_floor']} x the higher)"
        peaks = _float(fast.get("peak_MB")), _float(base.get("peak_MB")) if base is not None else None
        if peaks[0] is not None and peaks[1]:          # issue 16: at most 0.8x the official loop's
            line += f", peak {peaks[0]:.0f} MB = {peaks[0] / peaks[1]:.2f} x {baseline}'s"
        out.append(line)
    return out


def attention_lines(rows):
    """fastvar's training attention per case and mode (TFLOP/s, speedups over SDPA with the dense mask and over
    FlexAttention), and its KV-cached steps summed over each schedule against the official ``torch.cat`` step."""
    out = []
    for r in rows:
        if r.get("provider") == "fastvar" and r.get("mode") in ("fwd", "fwd+bwd"):
            line = f"  {r.get('case')} {r['mode']}: fastvar {r.get('TFLOP/s')} TFLOP/s ({r.get('pct_peak')}% of peak)"
            for col, name in (("speedup_vs_eager", "sdpa-dense"), ("speedup_vs_flex", "flex")):
                if r.get(col):
                    line += f", x{r[col]} vs {name}"
            out.append(line)
    totals = {}
    for r in rows:
        if r.get("mode") == "kv-step" and _float(r.get("ms")) is not None:
            key = r.get("case"), r.get("provider")
            totals[key] = totals.get(key, 0.0) + float(r["ms"])
    for (case, prov), ms in totals.items():
        if prov == "fastvar":
            line = f"  {case} KV steps, all scales: fastvar {ms:.3f} ms"
            for other in ("sdpa-cat", "sdpa-precat"):
                if (case, other) in totals:
                    line += f", x{totals[case, other] / ms:.2f} vs {other}"
            out.append(line)
    return out


def bench_line(name, rows):
    """One line per kernel benchmark: fastvar's rows, their speedup columns' median / min / max."""
    if not rows:
        return None
    fast = [r for r in rows if (r.get("provider") or "").startswith("fastvar")]
    cols = [c for c in rows[0] if c.startswith("speedup")]
    parts = []
    for c in cols:
        vals = [v for v in (_float(r.get(c)) for r in fast) if v is not None]
        if vals:
            parts.append(f"{c} median x{statistics.median(vals):.2f} (min {min(vals):.2f}, max {max(vals):.2f})")
    gbs = [v for v in (_float(r.get("gb_s") or r.get("GB/s")) for r in fast) if v is not None]
    if gbs:
        parts.append(f"GB/s up to {max(gbs):.0f}")
    return f"  {name}: {len(rows)} rows, {len(fast)} fastvar; " + ("; ".join(parts) if parts else "no speedup column")


def tile_lines(rows):
    """One line per kernel and shape of ``bench_attention.py --tiles``: the pinned tile (column ``pinned``)
    against the fastest candidate."""
    groups = {}
    for r in rows:
        if _float(r.get("ms")) is not None:
            groups.setdefault((r.get("case"), r.get("kernel"), r.get("scale")), []).append(r)
    out = []
    for (case, kernel, scale), group in groups.items():
        best = min(group, key=lambda r: float(r["ms"]))
        pinned = next((r for r in group if r["provider"] == r.get("pinned")), None)
        where = f"{case} {kernel}" + (f" scale {scale}" if scale else "")
        if pinned is None:
            out.append(f"  {where}: pinned {group[0].get('pinned')}: no row; fastest {best['provider']} "
                       f"{best['ms']} ms")
            continue
        line = f"  {where}: pinned {pinned['provider']} {pinned['ms']} ms"
        if best is pinned:
            line += f", the fastest of {len(group)}"
        else:
            line += f"; fastest {best['provider']} {best['ms']} ms (x{float(pinned['ms']) / float(best['ms']):.2f})"
        out.append(line)
    return out


def build(work, total, planned=()):
    """The summary's lines and the verdict. ``total``: the seconds the calls that wrote this record had; ``planned``:
    the stages of ``all``, in order (those neither run nor cut off are listed, with the next call that runs them)."""
    lines = ["# fastvar GPU campaign summary"]
    try:
        with open(os.path.join(work, "env.txt")) as f:
            lines += ["  " + l.strip() for l in f if l.strip()][:3]
    except OSError:
        lines.append("  (no env.txt: the install stage did not finish)")
    rows = stages(work)
    spent = sum(int(s[2]) for s in rows if s[2].isdigit())
    st = {}                                # a stage's last row (a second call, rest, runs what the first skipped)
    for s in rows:
        st.pop(s[0], None)
        st[s[0]] = s
    st = list(st.values())
    failed_stages = [s for s in st if s[1] not in ("ok", "skipped")]
    lines.append(f"## stages ({spent} s of {total} s)")
    lines += [f"  {s[0]:14s} {s[1]:14s} {s[2]:>4s} s / {s[3]:>3s} s" + (f"  {s[4]}" if len(s) > 4 and s[4] else "")
              for s in st]
    ran = {s[0] for s in st if s[1] != "skipped"}
    owed = [name for name in planned if name not in ran]
    if owed:
        lines.append(f"## not reached: {', '.join(owed)}")
        lines.append("  next call: FASTVAR_GPU_CHECK_WORK=<this work folder> gpu_check.sh rest (the same warm machine),"
                     f" else gpu_check.sh {','.join(n for n in owed if n != 'install')}")
    ceil = _csv(os.path.join(work, "ceilings.csv"))
    if ceil:
        lines.append("## ceilings: " + ", ".join(f"{r['metric']} {r['value']} {r['unit']}" for r in ceil))
    cold = _csv(os.path.join(work, "coldstart.csv"))
    if cold:
        lines.append("## cold start (d16 bf16; seconds, kernels loaded / compiled)")
        for r in cold:
            lines.append(f"  {r['mode']:8s} B={r['batch']:<3s} sample {r['sample']}: {r['seconds']:>8s} s  "
                         f"loaded {r['variants']:>3s} compiled {r['compiled']:>3s}")
    try:
        with open(os.path.join(work, "precompile.json")) as f:
            pre = json.load(f)["launches"]
        errors = [r for r in pre if "error" in r]
        spills = [r for r in pre if r.get("spill_bytes")]
        lines.append(f"## precompile: {len(pre)} launches compiled for this GPU's cache, {len(errors)} errors, "
                     f"{len(spills)} spilling (max {max([r['spill_bytes'] for r in spills] or [0])} B)")
    except (OSError, ValueError, KeyError):
        pass
    counts, failures, killed = tests(work)
    n_tests = sum(counts.values())
    tests_failed = counts["failed"] + counts["errors"]
    if n_tests or killed:
        lines.append(f"## GPU tests: {counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped" + (f"; cut off: {', '.join(killed)}" if killed else ""))
        for name, msg in failures[:MAX_FAILURES]:
            lines.append(f"  FAIL {name}: {msg}")
        if len(failures) > MAX_FAILURES:
            lines.append(f"  ... {len(failures) - MAX_FAILURES} more failures (campaign.tar.gz: tests_*.log)")
    e2e = _csv(os.path.join(work, "e2e.csv"))
    if e2e:
        lines.append("## end-to-end sampling (fastvar vs the official eager loop)")
        lines += e2e_lines(e2e, "eager")
    compiled = _csv(os.path.join(work, "e2e_compile.csv"))
    if compiled:
        lines.append("## end-to-end sampling under torch.compile (vs the official eager loop of the same run)")
        lines += e2e_lines(compiled, "eager", "compile")
    infinity = _csv(os.path.join(work, "infinity.csv"))
    if infinity:
        lines.append("## Infinity end-to-end (fastvar vs the official loop)")
        lines += e2e_lines(infinity, "official")
    attention = _csv(os.path.join(work, "attention.csv"))
    if attention:
        lines.append("## attention (fastvar; the official step is sdpa-cat)")
        lines += attention_lines(attention)
    own_sections = ("ceilings.csv", "coldstart.csv", "e2e.csv", "e2e_compile.csv", "infinity.csv", "tiles.csv",
                    "attention.csv")
    bench = [bench_line(os.path.basename(p)[:-4], _csv(p)) for p in sorted(glob.glob(os.path.join(work, "*.csv")))
             if os.path.basename(p) not in own_sections]
    bench = [b for b in bench if b]
    if bench:
        lines.append("## kernel benchmarks")
        lines += bench
    tiles = _csv(os.path.join(work, "tiles.csv"))
    if tiles:
        lines.append("## attention tiles (bench_attention.py --tiles: the pinned tile against the fastest)")
        lines += tile_lines(tiles)
    verdict = f"stages_failed={len(failed_stages)} tests_failed={tests_failed}"
    lines.append(f"## verdict: {verdict}" + (" (" + ", ".join(f"{s[0]} {s[1]}" for s in failed_stages) + ")"
                                             if failed_stages else ""))
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 2] + [f"  ... {len(lines) - MAX_LINES + 1} lines cut", lines[-1]]
    return lines, verdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work")
    p.add_argument("--out", default=None)
    p.add_argument("--total", type=int, default=540, help="the seconds of the calls that wrote this record")
    p.add_argument("--stages", default="", help="the stages of all, in order, space-separated")
    args = p.parse_args(argv)
    lines, verdict = build(args.work, args.total, args.stages.split())
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    with open(os.path.join(args.work, "verdict.txt"), "w") as f:
        f.write(verdict + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
