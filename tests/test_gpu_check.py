"""scripts/gpu_check.sh (the GPU campaign) on CPU, so that it does not fail for a silly reason on a GPU.

``all --dry-run`` runs every stage's smallest variant here (nvidia-smi stubbed; the install, the CUDA build
and the GPU-only benchmarks go as far as they can without a GPU: argument parsing); the summary, the
verdict, the per-test deadline and the bundling are checked on their own as well.
"""
import csv
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import pytest
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
STAGES = ["install", "ceilings", "cuda", "precompile", "tests", "e2e", "attention", "sampling", "upsample", "rq_lookup",
          "infinity", "coldstart", "adaln", "profile", "e2e_compile", "tiles", "bit_sampling", "cross_attention"]
KERNEL_BENCHES = ["attention", "sampling", "rq_lookup", "upsample", "adaln", "bit_sampling", "cross_attention",
                  "tiles"]


def gpu_check(base, *args, **environ):
    """``gpu_check.sh ARGS --dry-run`` with a stub nvidia-smi, its work folder and output under ``base``, and
    ``environ`` set: (the finished process, the output folder, the work folder)."""
    stub = base / "bin"
    stub.mkdir(parents=True)
    (stub / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3 (stub), 580.00, 81559 MiB'\n")
    (stub / "nvidia-smi").chmod(0o755)
    out, work = base / "out", base / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAR_BACKEND", "OUT")}
    env.update(PATH=f"{stub}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               PYTHON=sys.executable, FASTVAR_GPU_CHECK_WORK=str(work), TRITON_CACHE_DIR=str(base / "cache"))
    env.update(environ)
    work = Path(env["FASTVAR_GPU_CHECK_WORK"])
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), *args, "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    return proc, out, work


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return gpu_check(tmp_path_factory.mktemp("gpu_check"), "all")


def test_a_tree_without_git_history_needs_the_commit_named(tmp_path):
    """The device tool's copy has no .git: without FASTVAR_COMMIT the rows would say commit=unknown, so the
    campaign says so at once; named, it is what the rows carry."""
    proc, _, work = gpu_check(tmp_path / "a", "install,ceilings", GIT_DIR=str(tmp_path / "no-git"))
    assert proc.returncode == 0 and "FASTVAR_COMMIT is not set" in proc.stderr, proc.stderr[-2000:]
    assert "commit unknown" in (work / "env.txt").read_text()
    proc, _, work = gpu_check(tmp_path / "b", "install,ceilings", GIT_DIR=str(tmp_path / "no-git"),
                              FASTVAR_COMMIT="abc1234")
    assert proc.returncode == 0 and "FASTVAR_COMMIT" not in proc.stderr, proc.stderr[-2000:]
    assert "commit abc1234" in (work / "env.txt").read_text()


def test_at_most_eight_files_come_back():
    """summary.txt, campaign.tar.gz and the headline CSVs: the device tool brings back 8 files at most (on CPU the
    dry run cannot show it: the GPU benchmarks write no CSV there)."""
    with open(os.path.join(SCRIPTS, "gpu_check.sh")) as f:
        headline = re.search(r"^HEADLINE_CSVS=\(([^)]*)\)", f.read(), re.M).group(1).split()
    assert 2 + len(headline) <= 8, headline


def test_rest_runs_what_an_earlier_call_did_not_reach(tmp_path):
    """``rest`` (a second call on the warm machine): the stages of ``all`` that the work folder's record shows
    neither run nor cut off (a failed one is not rerun; a skipped one is), added to that record."""
    work = tmp_path / "work"
    work.mkdir()
    done = STAGES[:-3]
    record = "".join(f"{s}\t{'failed(rc=1)' if s == 'cuda' else 'ok'}\t1\t9\t\n" for s in done) + \
        "tiles\tskipped\t0\t0\tno time left of the 540 s budget\n"
    (work / "stages.tsv").write_text(record)
    (work / "budgets").write_text("540\n")
    (work / "verdict.txt").write_text("stages_failed=0 tests_failed=0\n")     # stale: this call writes its own
    proc, out, _ = gpu_check(tmp_path, "rest", FASTVAR_GPU_CHECK_WORK=str(work))
    # the verdict covers both calls: the earlier call's failed build fails this one too
    assert proc.returncode == 1 and "## verdict: stages_failed=1 tests_failed=0 (cuda failed(rc=1))" in proc.stdout, \
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(work / "stages.tsv") as f:
        rows = [line.split("\t")[:2] for line in f]
    assert rows[:len(done) + 1] == [line.split("\t")[:2] for line in record.splitlines()]
    assert rows[len(done) + 1:] == [[s, "ok"] for s in STAGES[-3:]]
    summary = (out / "summary.txt").read_text()
    assert "s of 1080 s)" in summary and "not reached" not in summary         # both calls' budgets; all ran
    assert [line.split()[:2] for line in summary.splitlines() if line.startswith("  tiles ")] == [["tiles", "ok"]]
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), "rest"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "FASTVAR_GPU_CHECK_WORK"})
    assert proc.returncode == 2
    assert "rest: FASTVAR_GPU_CHECK_WORK must name an earlier call's work folder" in proc.stderr


def test_a_list_of_stages_runs_as_all_does(tmp_path):
    """``STAGE,STAGE``: those stages in that order with the campaign's sizes (a second call for the stages the
    first one skipped); a stage that does not exist, or extra arguments, which only a lone stage takes, are
    refused before anything runs."""
    proc, out, work = gpu_check(tmp_path, "cuda,ceilings,tiles")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(work / "stages.tsv") as f:
        assert [line.split("\t")[:2] for line in f] == [["cuda", "ok"], ["ceilings", "ok"], ["tiles", "ok"]]
    assert "build_cuda.sh 90a" in (work / "cuda.log").read_text()      # the campaign's size, as under `all`
    tiles = (work / "tiles.log").read_text()          # the candidates recorded first (a GPU compiles them then)
    assert re.search(r"^# triton .*: [1-9]\d* paths, \d+ launches, [1-9]\d* distinct", tiles, re.M), tiles
    assert "Traceback" not in tiles
    for bad, why in ((["ceilings,nope"], "no stage 'nope'"), (["e2e coldstart,tiles"], "no stage 'e2e coldstart'"),
                     (["e2e,tiles", "--reps", "3"], "go to one stage alone"), (["e2e coldstart"], "usage")):
        proc = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), *bad], capture_output=True, text=True)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr


@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
    proc, out, work = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    with open(work / "stages.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert [r[0] for r in rows] == STAGES
    bad = {r[0]: r[1] for r in rows if r[1] != "ok"}
    assert not bad, {name: (status, (work / f"{name}.log").read_text()[-1500:]) for name, status in bad.items()}
    for name in KERNEL_BENCHES:   # the stage table names scripts that exist
        assert "does not exist" not in (work / f"{name}.log").read_text(), name
    # pip would build fastvar._C itself where nvcc and a GPU are found (setup.py), past the install's budget
    assert "env FASTVAR_BUILD_CUDA=0 " in (work / "install.log").read_text()
    assert "build_cuda.sh 90a" in (work / "cuda.log").read_text()
    # the profile stage's per-kernel tables, one per provider, each under a line naming the case and the commit
    tables = sorted((work / "profile").glob("profile_*.txt"))
    assert [t.name for t in tables] == ["profile_d2-smoke_B2_eager.txt", "profile_d2-smoke_B2_fastvar.txt"], tables
    for t in tables:
        title, *table = t.read_text().splitlines()
        assert "B=2" in title and "commit" in title and any("aten::" in line for line in table), t.read_text()[:800]


@pytest.mark.slow
def test_dry_run_output_fits_the_device_tool(dry_run):
    """At most 8 files, plain names, no sub-folders; the summary is the end of the output, <= 80 lines."""
    proc, out, work = dry_run
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all(os.path.isfile(out / f) for f in files)
    assert {"summary.txt", "campaign.tar.gz", "ceilings.csv", "coldstart.csv", "e2e.csv"} <= set(files), files
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) <= 80
    assert proc.stdout.rstrip().endswith(summary[-1]) and summary[-1].startswith("## verdict: stages_failed=0")
    for name in STAGES:
        assert any(line.split()[:2] == [name, "ok"] for line in summary), name
    with tarfile.open(out / "campaign.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"stages.tsv", "env.txt", "tests_1.xml", "tests_6.xml", "e2e.csv", "ceilings.csv", "infinity.csv"} <= names, names
    rows = list(csv.DictReader(open(out / "e2e.csv")))
    assert {r["provider"] for r in rows} == {"eager", "fastvar"}


@pytest.mark.slow
def test_dry_run_runs_the_ordered_test_groups(dry_run):
    """Six groups (five named, the rest), each a JUnit file; with no GPU every selected test skips (the named
    groups hold GPU tests; the rest may hold none)."""
    proc, out, work = dry_run
    for n in range(1, 7):
        log = (work / f"tests_{n}.log").read_text()
        assert (work / f"tests_{n}.xml").exists() and "failed" not in log, log[-1000:]
        assert n == 6 or "skipped" in log, log[-1000:]


def _summary(work, **files):
    sys.path.insert(0, SCRIPTS)
    try:
        import gpu_summary
    finally:
        sys.path.remove(SCRIPTS)
    for name, text in files.items():
        (work / name.replace("__", ".")).write_text(textwrap.dedent(text).lstrip())
    return gpu_summary.build(str(work), 540)


def test_summary_reports_failures_timeouts_and_cut_stages(tmp_path):
    junit = """
        <testsuites><testsuite name="pytest">
        <testcase classname="tests.test_attention" name="test_ok" time="1"/>
        <testcase classname="tests.test_attention" name="test_bad[bf16]" time="1"><failure message="AssertionError: out: relative error 0.5 &gt; 0.016">trace</failure></testcase>
        <testcase classname="tests.test_sampler" name="test_hang" time="90"><failure message="DeadlineExceeded: call ran past the 90 s deadline">x</failure></testcase>
        <testcase classname="tests.test_sampler" name="test_skip" time="0"><skipped message="no"/></testcase>
        </testsuite></testsuites>"""
    stages = "install\tok\t10\t60\t\ntests\ttimeout\t240\t240\t\ne2e\tskipped\t0\t0\tno time left of the 540 s budget\n"
    e2e = """
        device,model,batch,provider,ms,images_per_s,speedup_vs_eager,flop_floor_ms,weight_floor_ms,over_floor,scale
        H100,d16,1,eager,900,1.1,1.0,1,2,450,
        H100,d16,1,fastvar,100,10,9.0,1,2,50,
        H100,d16,1,fastvar,7,,,,,,0
        H100,d16,1,fastvar,30,,,,,,9
        """
    infinity = """
        device,model,batch,provider,ms,speedup_vs_eager,flop_floor_ms,weight_floor_ms,over_floor,scale
        H100,infinity-2b-random,1,official,2000,1.0,150,20,13.33,
        H100,infinity-2b-random,1,fastvar,400,5.0,150,20,2.67,
        H100,infinity-2b-random,1,fastvar,90,,,,,12
        """
    tiles = """
        device,case,provider,ms,speedup_vs_eager,kernel,scale,pinned
        H100,d30,128x128 w8 s3,1.6,1.250,fwd,,128x64 w4 s3
        H100,d30,128x64 w4 s3,2.0,1.000,fwd,,128x64 w4 s3
        H100,d30,64x64 w4 s4,2.5,0.800,fwd,,128x64 w4 s3
        H100,kv256,128x64 w8 s3,0.050,1.000,kv,9,128x64 w8 s3
        H100,kv256,64x64 w8 s3,0.060,0.833,kv,9,128x64 w8 s3
        H100,kv256,64x64 w8 s3,0.060,,kv,8,128x64 w8 s3
        """
    compiled = """
        device,model,batch,provider,ms,images_per_s,speedup_vs_eager,flop_floor_ms,weight_floor_ms,over_floor,scale,\
peak_MB
        H100,d30,64,eager,3000,21,1.0,300,10,10.0,,4000.0
        H100,d30,64,compile,1500,42,2.0,300,10,5.0,,3000.0
        """
    attention = """
        device,case,provider,mode,ms,TFLOP/s,pct_peak,speedup_vs_eager,speedup_vs_flex,scale
        H100,d16,sdpa-dense,fwd+bwd,3.0,100,10,1.000,,
        H100,d16,fastvar,fwd+bwd,1.0,300,30,3.000,1.500,
        H100,kv256,sdpa-cat,kv-step,0.5,,,,,0
        H100,kv256,sdpa-cat,kv-step,1.5,,,,,1
        H100,kv256,fastvar,kv-step,0.25,,,2.0,,0
        H100,kv256,fastvar,kv-step,0.75,,,2.0,,1
        """
    lines, verdict = _summary(tmp_path, stages__tsv=stages, tests_1__xml=junit, e2e__csv=e2e,
                              e2e_compile__csv=compiled, infinity__csv=infinity, tiles__csv=tiles,
                              attention__csv=attention,
                              tests_2__log="group 2: killed by its timeout\n")
    text = "\n".join(lines)
    assert verdict == "stages_failed=1 tests_failed=2"
    assert "1 passed, 2 failed, 0 errors, 1 skipped; cut off: tests_2" in text
    assert "FAIL test_attention::test_bad[bf16]: AssertionError: out: relative error 0.5 > 0.016" in text
    assert "FAIL test_sampler::test_hang: DeadlineExceeded" in text
    # the whole-sample rows, not the per-scale ones
    assert ("d16 B=1: fastvar 100 ms (10 img/s), eager 900 ms: x9.0, floors: FLOPs 1 ms, weights 2 ms "
            "(50 x the higher)") in text
    assert ("infinity-2b-random B=1: fastvar 400 ms, official 2000 ms: x5.0, floors: FLOPs 150 ms, weights 20 ms "
            "(2.67 x the higher)") in text
    assert "  d30 fwd: pinned 128x64 w4 s3 2.0 ms; fastest 128x128 w8 s3 1.6 ms (x1.25)" in lines
    assert "  kv256 kv scale 9: pinned 128x64 w8 s3 0.050 ms, the fastest of 2" in lines
    assert "  kv256 kv scale 8: pinned 128x64 w8 s3: no row; fastest 64x64 w8 s3 0.060 ms" in lines
    assert ("d30 B=64: compile 1500 ms (42 img/s), eager 3000 ms: x2.0, floors: FLOPs 300 ms, weights 10 ms "
            "(5.0 x the higher), peak 3000 MB = 0.75 x eager's") in text
    assert "  d16 fwd+bwd: fastvar 300 TFLOP/s (30% of peak), x3.000 vs sdpa-dense, x1.500 vs flex" in lines
    assert "  kv256 KV steps, all scales: fastvar 1.000 ms, x2.00 vs sdpa-cat" in lines
    assert not any(line.lstrip().startswith(("infinity:", "tiles:", "e2e_compile:", "attention:")) for line in lines)
    assert "e2e            skipped" in text and "no time left" in text
    assert len(lines) <= 80


def test_summary_of_two_calls_shows_each_stage_once_and_what_is_owed(tmp_path):
    """A record that two calls wrote (rest): a stage's last row, the time of both, the stages of all not reached
    and the calls that would run them."""
    stages = ("install\tok\t10\t60\t\ne2e\tskipped\t0\t0\tno time left of the 540 s budget\n"
              "attention\tfailed(rc=1)\t5\t60\t\ne2e\tok\t100\t110\t\n")
    (tmp_path / "stages.tsv").write_text(stages)
    sys.path.insert(0, SCRIPTS)
    try:
        import gpu_summary
    finally:
        sys.path.remove(SCRIPTS)
    lines, verdict = gpu_summary.build(str(tmp_path), 700, ["install", "e2e", "attention", "tiles", "adaln"])
    assert "## stages (115 s of 700 s)" in lines and verdict == "stages_failed=1 tests_failed=0"
    assert [line.split()[:2] for line in lines if line.startswith("  e2e ")] == [["e2e", "ok"]]
    assert "## not reached: tiles, adaln" in lines
    assert lines[lines.index("## not reached: tiles, adaln") + 1].endswith("else gpu_check.sh tiles,adaln")


def test_summary_stays_under_80_lines(tmp_path):
    cases = "".join(f'<testcase classname="t" name="test_{i}"><failure message="m{i}">x</failure></testcase>'
                    for i in range(200))
    lines, verdict = _summary(tmp_path, tests_1__xml=f"<testsuite>{cases}</testsuite>")
    assert len(lines) <= 80 and verdict.endswith("tests_failed=200")
    assert any("more failures" in line for line in lines)


def test_per_test_deadline_fails_the_slow_test_and_goes_on(tmp_path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import time
        def test_slow():
            time.sleep(30)
        def test_after():
            assert True
        """))
    env = dict(os.environ, PYTHONPATH=SCRIPTS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_deadline", "--deadline", "1",
                           "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_slow.py")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    assert "DeadlineExceeded" in proc.stdout and "ran past the 1 s deadline" in proc.stdout
