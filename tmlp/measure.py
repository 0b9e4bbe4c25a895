"""``tmlp bench``: measure the models of one run folder side by side, each in a fresh subprocess running
runtime/run.py (the file that runs on the device), and write bench.json and bench.md."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from tmlp.errors import TmlpError
from tmlp.io import write_json, write_text
from tmlp.runtime import run as runtime_run

__all__ = ["compare_reports", "find_run", "format_table", "load_report", "measure_in_subprocess", "median_of",
           "run_bench"]

# (label, file in the run folder, the file it is quantized from if missing, what is quantized)
VARIANTS = (("fp32 original", "original.onnx", None, None),
            ("int8 original (ORT dynamic)", "original.int8.onnx", "original.onnx", "matmul"),
            ("T-MLP", "tmlp.onnx", None, None),
            ("T-MLP + int8 (rest of the model)", "tmlp.int8.onnx", "tmlp.onnx", "rest"),
            ("T-MLP + int8 (per-centre tensors too)", "tmlp.int8-all.onnx", "tmlp.onnx", "all"),
            # written by `tmlp export --quantize static` (calibrated on training images); measured when present
            ("int8 original (ORT static QDQ)", "original.int8-static.onnx", None, "static"),
            ("T-MLP + static int8 (rest of the model)", "tmlp.int8-static.onnx", None, "static"))
QUANTIZED_OPS = {"matmul": ["MatMul", "Gemm"], "rest": ["MatMul", "Gemm"], "all": ["MatMul", "Gemm", "Gather"]}


def find_run(root: str = "runs") -> str:
    """The newest run folder (by manifest.json time) under ``root``."""
    manifests = glob.glob(os.path.join(root, "*", "manifest.json"))
    if not manifests:
        raise TmlpError(f"no exported run under {root!r}; run `tmlp export --model deit_small --k 100` first or pass "
                        "--run DIR")
    return os.path.dirname(max(manifests, key=os.path.getmtime))


def measure_in_subprocess(model: str, data: str | None, provider: str, threads: int, warmup: int, runs: int,
                          batch: int, accuracy: bool = True, arena: bool = True, fallback: bool = False
                          ) -> dict[str, Any]:
    """Run runtime/run.py on ``model`` in a fresh Python process; returns its Measurement as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        cmd = [sys.executable, runtime_run.__file__, model, "--provider", provider, "--threads", str(threads),
               "--warmup", str(warmup), "--runs", str(runs), "--batch", str(batch), "--json", out]
        if data:
            cmd += ["--data", data] + ([] if accuracy else ["--no-accuracy"])
        if not arena:
            cmd.append("--no-arena")
        if fallback:
            cmd.append("--allow-fallback")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise TmlpError(f"measuring {model} failed: {tail[-1] if tail else 'no output'}")
        with open(out) as f:
            return json.load(f)


def exact_units(manifest: dict[str, Any]) -> dict[str, int]:
    """{replaced block: hidden units it keeps exact} of a run (tmlp.taylor.exact): the manifest's own record, else
    (runs written before the plan chose units per block) the spec's one count for every block."""
    if isinstance(manifest.get("exact_units"), dict):
        return {f: int(m) for f, m in manifest["exact_units"].items()}
    calibration = manifest.get("spec", {}).get("_data", {}).get("calibration", {}).get("_data", {})
    return {f: int(calibration.get("exact_units", 0)) for f in manifest.get("layers") or []}


def run_bench(run_dir: str, provider: str = "cpu", threads: int = 1, warmup: int = 10, runs: int = 50,
              batch: int = 1, repeats: int = 3, progress=print, fallback: bool = False) -> dict[str, Any]:
    """Measure original, int8 original, T-MLP and T-MLP + int8 in ``run_dir``; write bench.json and bench.md.

    Each variant is measured ``repeats`` times, each time in a fresh process, the variants interleaved, so that a
    slow spell of a shared machine does not fall on one variant only; latency and memory are the medians over the
    repeats (each repeat's own figures are kept in bench.json), accuracy comes from the first."""
    if repeats < 1:
        raise TmlpError(f"--repeats must be >= 1, got {repeats}")
    try:  # a provider this onnxruntime lacks is refused here, before anything is quantized or measured
        runtime_run.session_providers(provider, fallback)
    except runtime_run.RunError as err:
        raise TmlpError(str(err)) from None
    manifest_path = os.path.join(run_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise TmlpError(f"{run_dir!r} has no manifest.json; pass a folder written by `tmlp export`")
    with open(manifest_path) as f:
        manifest = json.load(f)
    data = os.path.join(run_dir, "val.npz")
    data = data if os.path.isfile(data) else None
    variants = [v for v in VARIANTS if v[3] != "static" or os.path.isfile(os.path.join(run_dir, v[1]))]
    paths = []
    for label, name, source, what in variants:
        path = os.path.join(run_dir, name)
        paths.append(path)
        if not os.path.isfile(path):
            if source is None:
                raise TmlpError(f"{path} is missing; export again with `tmlp export`")
            from tmlp.export.quantize import quantize_int8_dynamic
            from tmlp.taylor.exact import float_scopes

            taylor = float_scopes(exact_units(manifest)) if what == "rest" and manifest.get("layers") else None
            ops = QUANTIZED_OPS[what]
            progress(f"quantizing {source} -> {name} (onnxruntime quantize_dynamic: int8 {'/'.join(ops)} weights"
                     f"{'; Taylor blocks stay fp32' if taylor else ''})")
            quantize_int8_dynamic(os.path.join(run_dir, source), path, op_types=ops, exclude_scopes=taylor)
    measured: list[list[dict[str, Any]]] = [[] for _ in variants]
    for rep in range(repeats):
        for i, (label, name, _, _) in enumerate(variants):
            progress(f"measuring {label} [{rep + 1}/{repeats}]: {name} (fresh process, {threads} thread(s), "
                     f"{runs} runs of batch {batch})")
            measured[i].append(measure_in_subprocess(paths[i], data, provider, threads, warmup, runs, batch,
                                                     accuracy=rep == 0, fallback=fallback))
    rows = [{"variant": label, "file": name, **median_of(reps)} for (label, name, _, _), reps in zip(variants,
                                                                                                   measured)]
    base = rows[0]
    for row in rows:
        row["speedup_vs_fp32"] = base["latency_ms"]["p50"] / row["latency_ms"]["p50"]
        row["size_ratio_vs_fp32"] = row["file_bytes"] / base["file_bytes"]
    result = {"run": run_dir, "model": manifest.get("model"), "dataset": manifest.get("dataset"),
              "taylor_config": manifest.get("taylor_config"), "layers": manifest.get("layers"),
              "plan": (manifest.get("layer_plan") or {}).get("choice"),
              "provider": ran_on(rows), "requested_provider": runtime_run.PROVIDERS.get(provider, provider),
              "threads": threads, "batch": batch, "warmup": warmup, "runs": runs,
              "repeats": repeats,
              "machine": base["machine"], "rows": rows}
    result["markdown"] = format_table(result)
    write_json(os.path.join(run_dir, "bench.json"), {k: v for k, v in result.items() if k != "markdown"})
    write_text(os.path.join(run_dir, "bench.md"), result["markdown"] + "\n")
    return result


def ran_on(rows: list[dict[str, Any]]) -> str:
    """The provider(s) that ran the variants, as each measurement recorded it ("A / B" if they differ)."""
    return " / ".join(dict.fromkeys(r["provider"] for r in rows))


def provider_note(result: dict[str, Any]) -> str:
    """'CPUExecutionProvider', or '... (asked for CUDAExecutionProvider: not available, fell back to the CPU
    with --allow-fallback)'."""
    asked = result.get("requested_provider")
    if asked and asked != result["provider"]:
        return f"{result['provider']} (asked for {asked}: not available, fell back with --allow-fallback)"
    return result["provider"]


def median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's repeats folded into one row: the first repeat, with median latency and peak RSS."""
    import statistics

    row = dict(reps[0])
    row["latency_ms"] = {k: statistics.median(r["latency_ms"][k] for r in reps) for k in reps[0]["latency_ms"]}
    deltas = [r["peak_rss_delta_mb"] for r in reps if r.get("peak_rss_delta_mb") is not None]
    row["peak_rss_delta_mb"] = statistics.median(deltas) if deltas else None
    row["throughput_per_s"] = row["batch"] * 1e3 / row["latency_ms"]["mean"]
    row["repeats"] = [{"latency_ms": r["latency_ms"], "peak_rss_delta_mb": r.get("peak_rss_delta_mb")} for r in reps]
    return row


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of a bench result, with a line saying what was measured and where."""
    m = result["machine"]
    cfg = (result.get("taylor_config") or {}).get("_data", {})
    ranks = f"{cfg.get('rank')}" + (f"/{cfg['rank_out']}" if cfg.get("rank_out") else "")  # input/output rank
    form = f"shared basis r={ranks} ({cfg.get('basis_source')})" if cfg.get("basis") == "shared" else \
        "dense Jacobians"
    head = f"k={cfg.get('k')}"
    plan = {f: c for f, c in (result.get("plan") or {}).items() if c}
    if plan:
        ks = sorted({c["k"] for c in plan.values()})
        ranks = sorted({c["rank"] for c in plan.values() if c.get("rank")})
        units = sorted({c.get("units", 0) for c in plan.values()})
        head = (f"per-block plan (k in {ks}" + (f", r in {ranks}" if ranks else "")
                + (f", exact units in {units}" if units != [0] else "") + ")")
        form = "shared basis" if ranks else form
    lines = [f"{result['model']} on {result['dataset']}: T-MLP {head}, order {cfg.get('order')}, {form}, "
             f"{len(result.get('layers') or [])} block(s) replaced. onnxruntime {m['onnxruntime']} "
             f"{provider_note(result)}, {result['threads']} thread(s), batch {result['batch']}, {result['runs']} runs "
             f"after {result['warmup']} warm-up, median of {result['repeats']} fresh processes per variant; "
             f"{m['cpu']} ({m['machine']}, {m['cores']} cores).", "",
             "| variant | accuracy | p50 ms | p90 ms | speed-up vs fp32 | peak RSS MiB | file MB | size vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        acc = f"{100 * r['accuracy']:.2f}% (n={r['n_eval']})" if r.get("accuracy") is not None else "n/a"
        rss = f"{r['peak_rss_delta_mb']:.1f}" if r.get("peak_rss_delta_mb") is not None else "n/a"
        lines.append(f"| {r['variant']} | {acc} | {r['latency_ms']['p50']:.3f} | {r['latency_ms']['p90']:.3f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {rss} | {r['file_bytes'] / 1e6:.2f} | "
                     f"{r['size_ratio_vs_fp32']:.2f}x |")
    return "\n".join(lines)


def load_report(path: str) -> dict[str, Any]:
    """A device report written by ``runtime/run.py --report``."""
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise TmlpError(f"report {path!r} does not exist; write one with `python runtime/run.py model.onnx "
                        "--report out.json`") from None
    except json.JSONDecodeError as e:
        raise TmlpError(f"report {path!r} is not JSON ({e}); write it again with runtime/run.py --report") from None
    if report.get("format") != "tmlp-device-report":
        raise TmlpError(f"{path!r} is not a device report (no format 'tmlp-device-report'); write one with "
                        "`python runtime/run.py model.onnx --report out.json`")
    return report


def compare_reports(reports: list[dict[str, Any]]) -> str:
    """Device reports side by side, one column per report, as a markdown table."""
    def mib(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    rows = [
        ("board", lambda r: r.get("label", "?")),
        ("machine", lambda r: r["machine"].get("machine", "?")),
        ("CPU", lambda r: r["machine"].get("cpu", "?")),
        ("cores", lambda r: r["machine"].get("cores", "?")),
        ("onnxruntime", lambda r: f"{r['machine'].get('onnxruntime', '?')} ({r['provider']})"),
        ("threads", lambda r: str(r["threads"])),
        ("model", lambda r: f"{os.path.basename(r['model'])} ({r['file_bytes'] / 1e6:.1f} MB)"),
        ("batch", lambda r: str(r["batch"])),
        ("latency p50 ms", lambda r: f"{r['latency_ms']['p50']:.3f}"),
        ("latency p90 ms", lambda r: f"{r['latency_ms']['p90']:.3f}"),
        ("latency p99 ms", lambda r: f"{r['latency_ms']['p99']:.3f}"),
        ("images/s", lambda r: f"{r['throughput_per_s']:.1f}"),
        ("weights MiB", lambda r: mib(r.get("weights_mb"))),
        ("peak RSS delta MiB (arena on)", lambda r: mib(r.get("peak_rss_delta_mb"))),
        ("peak RSS delta MiB (arena off)", lambda r: mib(r.get("peak_rss_delta_no_arena_mb"))),
        ("accuracy", lambda r: "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}% (n={r['n_eval']})"),
    ]
    lines = ["| | " + " | ".join(f"report {i + 1}" for i in range(len(reports))) + " |",
             "| --- |" + " --- |" * len(reports)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(str(get(r)) for r in reports) + " |")
    return "\n".join(lines)
