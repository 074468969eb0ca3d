"""The GPU campaign (issue 15) cannot rot between GPU windows: every phase runs end to end in
``--smoke`` on CPU (tiny shapes, Triton interpreter), its output converts into labelled CPU-smoke
result files (never into benchmarks/results), a failing or hanging phase leaves the others,
the targets are judged as met / missed / not measured, and the wheel pins match what CI tests.
Nothing here is timed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from soda_mega.perf import campaign_report as cr

REPO = Path(__file__).resolve().parents[2]
CAMPAIGN = REPO / "benchmarks" / "gpu_campaign.py"


def _campaign_module():
    spec = importlib.util.spec_from_file_location("gpu_campaign_under_test", CAMPAIGN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    out, bundle = root / "work", root / "device_out" / "campaign.tar.gz"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(CAMPAIGN), "--smoke", "--out", str(out),
                           "--bundle", str(bundle)], capture_output=True, text=True, timeout=1200,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, bundle, proc.stdout


def test_every_phase_runs_in_smoke(smoke):
    out, bundle, stdout = smoke
    camp = json.loads((out / "campaign.json").read_text())
    module = _campaign_module()
    assert camp["smoke"] is True
    assert [p["name"] for p in camp["phases"]] == list(module.PHASES)
    bad = {p["name"]: (p["status"], p.get("reason")) for p in camp["phases"] if p["status"] != "ok"}
    assert not bad, bad
    env = json.loads((out / "env.json").read_text())
    assert env["provenance"]["device"]["kind"] == "cpu" and env["status"] == "complete"
    assert env["matmul_peak"]["tflops"] > 0 and env["copy_bandwidth"]["gb_per_s"] > 0

    krows = [r for name in ("kernels", "kernels_triton")
             for r in json.loads((out / f"{name}.json").read_text())["rows"]]
    assert not [r for r in krows if "error" in r]
    triton_rows = json.loads((out / "kernels_triton.json").read_text())["rows"]
    assert {r["impl"] for r in triton_rows if "fwd_bwd" in r} == set(module.SODA_IMPLS)
    # issue 34: both designs x both GEMM engines and the measured choice at every shape
    chosen = [r for r in triton_rows if r.get("impl") == "soda_triton_train_measured"]
    assert {r["tp"] for r in chosen} == {1, 2} and all(len(r["candidates_s"]) == 4 for r in chosen)
    timed = {(r["op"], r["impl"]) for r in krows if "fwd_bwd" in r}
    assert {("loss", "soda_triton"), ("loss", "soda_triton_train"), ("loss", "torch_eager"),
            ("loss", "megatron"),
            ("embedding", "soda_triton"), ("embedding", "torch"),
            ("embedding", "torch+modality")} <= timed
    assert {r["tp"] for r in krows if r["op"] == "loss"} == {1, 2}

    rows = {r["variant"]: r for name in ("throughput", "throughput_triton")
            for r in json.loads((out / f"{name}.json").read_text())["rows"]}
    assert rows["megatron"]["status"] == "ok" and rows["megatron"]["tokens_per_s_per_gpu"] > 0
    assert rows["triton"]["status"] == "skipped" and "CUDA" in rows["triton"]["reason"]
    planner = json.loads((out / "planner.json").read_text())["rows"]
    assert [r["variant"] for r in planner] == ["megatron", "triton"]
    assert planner[0]["predicted_allocated_gib"] > 0 and "within_10pct" not in planner[0]

    pytest_phase = json.loads((out / "pytest.json").read_text())
    assert pytest_phase["returncode"] == 0 and pytest_phase["counts"]["skipped"] > 0
    shares = json.loads((out / "profile.json").read_text())["breakdown"]["share"]
    assert sum(v for k, v in shares.items()) == pytest.approx(1.0, abs=0.05)
    probe = json.loads((out / "megatron_newest.json").read_text())["probe"]
    assert probe["imports"] and probe["trained_one_step"], probe
    plan = json.loads((out / "plan_layouts.json").read_text())  # issue 36: prediction beside each
    assert plan["comparable"] is False and [r["status"] for r in plan["rows"]] == ["ok", "ok"]
    assert all(r["predicted_step_s"] > 0 and "predicted_over_measured" not in r for r in plan["rows"])

    # what comes back from the device tool: the bundle and the summary beside it
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert {f"{out.name}/campaign.json", f"{out.name}/summary.md", f"{out.name}/kernels.json"} <= names
    summary = (bundle.parent / "summary.md").read_text()
    assert summary.startswith("# CPU smoke run") and "CPU SMOKE RUN" in summary
    assert "not measured" in stdout


def test_smoke_converts_to_labelled_files_never_into_results(smoke, tmp_path):
    out, bundle, _ = smoke
    with pytest.raises(ValueError, match="CPU smoke run"):
        cr.convert(bundle, cr.RESULTS)
    assert not list(cr.RESULTS.glob("smoke_cpu_*"))
    written = cr.convert(bundle, tmp_path)
    stems = {p.stem for p in written}
    assert len(stems) == 1 and re.fullmatch(r"smoke_cpu_\d{4}-\d{2}-\d{2}", stems.pop())
    assert {p.suffix for p in written} == {".json", ".md", ".png"}
    payload = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert payload["smoke"] is True and payload["provenance"]["commit"]
    assert "megatron-core" in payload["provenance"]["versions"]
    assert [t["status"] for t in payload["targets"]] == [cr.NOT_MEASURED] * len(cr.TARGETS)
    md = next(p for p in written if p.suffix == ".md").read_text()
    assert "CPU SMOKE RUN" in md and "Measured loss plan per shape" in md
    assert cr.convert(out, tmp_path) == written  # the same campaign again: the same files
    camp = json.loads((out / "campaign.json").read_text())
    later = tmp_path / "later"
    shutil.copytree(out, later)
    camp["started_utc"] = camp["started_utc"][:11] + "23:59:00+00:00"
    (later / "campaign.json").write_text(json.dumps(camp))
    (again,) = [p for p in cr.convert(later, tmp_path) if p.suffix == ".json"]
    assert again.stem.endswith("_2359") and len(list(tmp_path.glob("smoke_cpu_*.json"))) == 2
    assert cr.newest_result(tmp_path) is None  # a smoke result never feeds the README


def test_failing_hanging_and_late_phases_leave_the_others(tmp_path):
    module = _campaign_module()
    module.register(module.Phase("fails", 30, 30, "exits 3",
                                 command=("{python}", "-c", "import sys; print('boom'); sys.exit(3)")))
    module.register(module.Phase("hangs", 2, 2, "sleeps", command=("{python}", "-c",
                                                                   "import time; time.sleep(60)")))
    module.register(module.Phase("writes", 30, 30, "writes into its folder", command=(
        "{python}", "-c", "import pathlib, sys; d = pathlib.Path(sys.argv[1]); "
        "(d / 'r.json').write_text('{\"tokens_per_s\": 7}'); (d / 'r.md').write_text('# codec\\n| a |')",
        "{phase_dir}")))
    with pytest.raises(ValueError, match="twice"):
        module.register(module.Phase("fails", 1, 1, "again", command=("true",)))
    # "hangs" first: a phase's budget grows by what earlier phases left unused
    args = module.parse_args(["--smoke", "--out", str(tmp_path / "c"), "--total-s", "40",
                              "--phases", "hangs", "fails", "writes", "planner"])
    assert module.campaign(args) == 1
    phases = {p["name"]: p for p in json.loads((tmp_path / "c" / "campaign.json").read_text())["phases"]}
    assert phases["fails"]["status"] == "error" and "boom" in phases["fails"]["reason"]
    assert phases["hangs"]["status"] == "timeout" and phases["hangs"]["seconds"] < 15
    assert phases["writes"]["status"] == "ok"
    writes = json.loads((tmp_path / "c" / "writes.json").read_text())
    assert writes["files"] == ["r.json", "r.md"] and writes["results"]["r.json"] == {"tokens_per_s": 7}
    assert "### codec\n| a |" in (tmp_path / "c" / "summary.md").read_text()
    assert phases["planner"]["status"] == "ok"  # no throughput result: says so, does not fail
    planner = json.loads((tmp_path / "c" / "planner.json").read_text())
    assert "no throughput result" in planner["notes"]["throughput"]
    args = module.parse_args(["--smoke", "--out", str(tmp_path / "d"), "--total-s", "1",
                              "--phases", "writes"])
    module.campaign(args)
    (late,) = json.loads((tmp_path / "d" / "campaign.json").read_text())["phases"]
    assert late["status"] == "skipped" and "used up" in late["reason"]


def _gpu_like(tri_over_eager: list[float], mfu_17b: float, pred_over_meas: float) -> dict:
    """A campaign result shaped like a GPU run, to exercise the target rules (not a figure)."""
    krows = []
    for i, ratio in enumerate(tri_over_eager):
        shape = {"tokens": 8192, "hidden": 512 * (i + 1), "vocab_local": 144_644, "tp": 1}
        krows += [{"op": "loss", **shape, "impl": "soda_triton", "fwd_bwd": 1.0, "peak_bytes": 100},
                  {"op": "loss", **shape, "impl": "torch_eager", "fwd_bwd": ratio, "peak_bytes": 900},
                  {"op": "loss", **shape, "impl": "liger", "fwd_bwd": 1.4, "peak_bytes": 120},
                  {"op": "loss_memory_budget", **shape, "budget_above_inputs_bytes": 90}]
    krows += [{"op": "embedding", "tokens": 8192, "hidden": 512, "vocab_local": 144_644,
               "impl": impl, "fwd_bwd": t} for impl, t in (("soda_triton", 1.0), ("torch+modality", 1.5))]
    trows = [{"case": "soda-1.7b", "variant": "triton", "status": "ok", "mfu_vs_spec_peak": mfu_17b,
              "tokens_per_s_per_gpu": 1000.0, "model_tflops_per_gpu": 1.0, "mfu_vs_measured_gemm": 0.5},
             {"case": "soda-135m", "variant": "triton", "status": "error", "reason": "out of memory"}]
    prov = {"device": {"kind": "cuda", "name": "NVIDIA H200"}, "versions": {}, "commit": "abc"}
    return {"campaign": {"smoke": False, "started_utc": "2026-12-01T10:00:00+00:00", "phases": []},
            "phases": {"env": {"provenance": prov},
                       "kernels": {"rows": krows},
                       "throughput": {"rows": trows},
                       "planner": {"rows": [{"case": "soda-1.7b", "variant": "triton",
                                             "predicted_over_measured": pred_over_meas,
                                             "within_10pct": abs(pred_over_meas - 1) <= 0.1}]}}}


def test_targets_are_met_missed_or_not_measured():
    got = {t["id"]: t for t in cr.evaluate_targets(_gpu_like([2.5, 1.5], 0.55, 1.04))}
    assert got["loss_vs_eager"]["status"] == cr.MISSED and got["loss_vs_eager"]["value"] == 1.5
    assert "1/2 shapes" in got["loss_vs_eager"]["detail"]
    assert got["loss_vs_liger_cce"]["status"] == cr.MET  # 1.4x >= 1.3x at both shapes
    assert got["loss_memory"]["status"] == cr.MET and got["loss_memory"]["value"] == pytest.approx(100 / 90)
    assert got["embedding_vs_torch"]["status"] == cr.MET
    assert got["mfu_1.7b"]["status"] == cr.MET
    assert got["mfu_135m"]["status"] == cr.NOT_MEASURED and "out of memory" in got["mfu_135m"]["detail"]
    assert got["planner"]["status"] == cr.MET
    got = {t["id"]: t["status"] for t in cr.evaluate_targets(_gpu_like([3.0], 0.42, 1.2))}
    assert got["loss_vs_eager"] == cr.MET and got["mfu_1.7b"] == cr.MISSED and got["planner"] == cr.MISSED
    assert cr.result_stem(_gpu_like([3.0], 0.5, 1.0)) == "gpu_h200_2026-12-01"


def test_readme_section_is_generated_from_the_newest_gpu_result(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{cr.BEGIN}\nstale\n{cr.END}\n\nafter\n")
    results = tmp_path / "results"
    results.mkdir()
    assert cr.update_readme(readme, results) is None
    text = readme.read_text()
    assert "No GPU campaign has run yet" in text and "stale" not in text
    assert text.count("| not measured |") == len(cr.TARGETS) and text.endswith(f"{cr.END}\n\nafter\n")
    for day, mfu in (("2026-12-01", 0.45), ("2026-12-02", 0.55)):
        data = _gpu_like([3.0], mfu, 1.0)
        data["campaign"]["started_utc"] = f"{day}T10:00:00+00:00"
        (results / f"gpu_h200_{day}.json").write_text(json.dumps(
            {"benchmark": "gpu_campaign", "smoke": False, "provenance": cr.provenance(data),
             "targets": cr.evaluate_targets(data), "campaign": data["campaign"],
             "phases": data["phases"]}))
    assert cr.update_readme(readme, results).name == "gpu_h200_2026-12-02.json"
    text = readme.read_text()
    assert "gpu_h200_2026-12-02.json" in text and "55.0%" in text and "No GPU campaign" not in text
    bad = tmp_path / "NOMARK.md"
    bad.write_text("no markers\n")
    with pytest.raises(ValueError, match="section"):
        cr.update_readme(bad, results)


def test_repository_readme_section_is_current():
    """README.md's performance section is exactly what the newest committed result gives."""
    text = (REPO / "README.md").read_text()
    start, end = text.index(cr.BEGIN), text.index(cr.END) + len(cr.END)
    newest = cr.newest_result()
    payload = json.loads(newest.read_text()) if newest else None
    source = str(newest.relative_to(REPO)) if newest else ""
    assert text[start:end] == cr.readme_section(payload, source), \
        "run: python -m soda_mega.perf.campaign_report readme"


def test_gpu_wheel_pins_match_what_ci_installs():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def reqs(path):
        lines = (REPO / path).read_text().splitlines()
        return [Requirement(ln.split("#")[0].strip()) for ln in lines if ln.split("#")[0].strip()]

    ci = {canonicalize_name(r.name): r for r in reqs("requirements/runtime.txt") + reqs("requirements/nodeps.txt")}
    pins = reqs("benchmarks/gpu_wheels.txt")
    names = [canonicalize_name(r.name) for r in pins]
    assert len(names) == len(set(names))
    for r in pins:
        (spec,) = r.specifier
        assert spec.operator == "==", r
        name = canonicalize_name(r.name)
        if name in ci:
            assert ci[name].specifier.contains(spec.version), (r, ci[name])
    mcore = ci["megatron-core"].specifier
    assert mcore.contains("0.16.1") and not mcore.contains("0.17.0"), "pin the tested range"
    assert {"megatron-core", "mosaicml-streaming", "liger-kernel", "cut-cross-entropy"} <= set(names)
    assert "/.gpu-wheels/" in (REPO / ".gitignore").read_text().split()


def test_help_lists_the_phases():
    proc = subprocess.run([sys.executable, str(CAMPAIGN), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0
    for name in ("env", "pytest", "kernels", "kernels_triton", "throughput", "throughput_triton",
                 "planner", "profile", "codec", "checkpoint", "megatron_newest"):
        assert f"{name}:" in proc.stdout


IMPORT_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
from packaging.utils import canonicalize_name as canon
available = set(json.loads(sys.argv[1]))
dists = md.packages_distributions()


# Packages the GPU host lacks do not exist here: a module-level import of one fails, an
# optional one (``try: import wandb``, ``importlib.util.find_spec``, as Megatron, TensorBoard
# and transformers do) finds nothing. A None entry in sys.modules is exactly that.
for top, owners in dists.items():
    if not {canon(d) for d in owners} & available and top not in sys.modules:
        sys.modules[top] = None
sys.path.insert(0, "benchmarks")
for name in ("gpu_campaign", "bench_kernels", "soda_mega.training.trainer", "soda_mega.perf.throughput",
             "soda_mega.perf.profiling", "soda_mega.perf.campaign_report", "soda_mega.utils.telemetry",
             "soda_kernels.fused_linear_cross_entropy", "soda_kernels.interleaved_embedding"):
    importlib.import_module(name)
from soda_mega.data.streaming_compat import streaming_base
streaming_base()
importlib.import_module("streaming.base.compression")
print("imports ok")
"""
#: setuptools vendors these (setuptools/_vendor); the host's setuptools brings them along
SETUPTOOLS_VENDORED = {"backports-tarfile", "jaraco-functools", "jaraco-context", "jaraco-text",
                       "more-itertools", "autocommand", "inflect", "typeguard", "platformdirs",
                       "tomli", "importlib-metadata"}


def test_campaign_imports_only_what_the_gpu_host_has_or_gets_as_a_wheel():
    """A module-level import of a package the GPU host lacks (and no wheel brings) would stop
    the campaign there: the phases' modules are imported with every package that is neither
    on the host's package list nor a carried wheel made unimportable."""
    from packaging.utils import canonicalize_name as canon

    def names(path):
        lines = (REPO / "benchmarks" / path).read_text().splitlines()
        return {canon(re.split(r"[=<>\s]", ln.split("#")[0].strip())[0])
                for ln in lines if ln.split("#")[0].strip()}

    available = (names("gpu_host_packages.txt") | names("gpu_wheels.txt") | {"soda-mega"}
                 | SETUPTOOLS_VENDORED)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, json.dumps(sorted(available))],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, \
        ("import these lazily, or add their wheels to benchmarks/gpu_wheels.txt:\n"
         + proc.stderr[-3000:])
