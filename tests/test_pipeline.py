"""The whole pipeline through the CLI on a tiny model: train -> export -> bench -> runtime/run.py, and resuming."""
import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tmlp.cli import main

RUN_PY = os.path.join(os.path.dirname(__file__), "..", "runtime", "run.py")


def _ok(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    out = _ok(["train", "--model", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4",
               "--epoch", "6", "--optimizer", "adamw", "--lr", "1e-3", "--batch_size", "32", "--augment", "none",
               "--eval-every", "1", "--path", str(folder)])
    assert "best validation accuracy" in out
    return folder


def test_training_writes_checkpoints_and_log(trained):
    rows = [json.loads(line) for line in open(trained / "train_log.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert max(r["val_acc"] for r in rows) > 0.75  # 6 epochs of a 6-block ViT on digits (measured: ~0.9)


def test_training_resumes_where_it_stopped(trained):
    out = _ok(["train", "--model", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4",
               "--epoch", "7", "--optimizer", "adamw", "--lr", "1e-3", "--batch_size", "32", "--augment", "none",
               "--eval-every", "1", "--path", str(trained)])
    assert "resuming" in out and "epoch 7" in out
    assert [json.loads(line)["epoch"] for line in open(trained / "train_log.jsonl")] == list(range(1, 8))


def test_resume_with_other_settings_is_refused(trained):
    result = CliRunner().invoke(main, ["train", "--model", "test_vit", "--dataset", "digits", "--img-size", "16",
                                       "--patch-size", "4", "--epoch", "7", "--lr", "0.1", "--path", str(trained)])
    assert result.exit_code == 2 and "other settings" in result.stderr


TINY = ["--model", "test_vit", "--dataset", "digits", "--img-size", "16", "--patch-size", "4", "--optimizer", "adamw",
        "--lr", "1e-3", "--batch_size", "32", "--augment", "none", "--eval-every", "1"]


def test_init_starts_a_new_run_from_a_checkpoint(trained, tmp_path):
    out = _ok(["train", *TINY, "--epoch", "1", "--lr", "2e-4", "--init", str(trained / "best.pt"),
               "--path", str(tmp_path / "new")])
    assert "starting from the weights" in out
    first = json.loads(open(tmp_path / "new" / "train_log.jsonl").readline())
    assert first["val_acc"] > 0.75  # from trained weights, not from scratch (scratch after 1 epoch: ~0.2)


def test_init_of_another_architecture_is_refused(trained, tmp_path):
    # (another --img-size is allowed for a ViT: its position embeddings are resampled; another patch size is not)
    result = CliRunner().invoke(main, ["train", *TINY, "--patch-size", "8", "--init", str(trained / "best.pt"),
                                       "--path", str(tmp_path / "new")])
    assert result.exit_code == 2 and "--init" in result.stderr and "patch_size" in result.stderr
    assert not (tmp_path / "new" / "last.pt").exists()


def test_a_run_snapshot_continues_the_run_on_another_machine(trained, tmp_path):
    snapshot = tmp_path / "snapshot_fp16.pt"
    out = _ok(["models", "fp16-copy", str(trained / "last.pt"), str(snapshot)])
    assert "run snapshot" in out
    out = _ok(["train", *TINY, "--epoch", "8", "--init", str(snapshot), "--path", str(tmp_path / "moved")])
    assert "continuing the run snapshot" in out and "epoch 8" in out
    rows = [json.loads(line) for line in open(tmp_path / "moved" / "train_log.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, 9))  # the old log carried over, one epoch added
    assert rows[-1]["val_acc"] > 0.75 and (tmp_path / "moved" / "best.pt").exists()
    # a snapshot exports like any checkpoint
    from tmlp.models import load_checkpoint
    assert load_checkpoint(snapshot)[1]["preprocessing"]["input_size"] == [16, 16]


def test_a_snapshot_of_a_copied_last_pt_warns_that_it_carries_no_log(trained, tmp_path):
    """A last.pt copied out of its run folder has no train_log.jsonl beside it: the snapshot is written (weights and
    schedule position) but says that its log is empty."""
    import shutil

    shutil.copy(trained / "last.pt", tmp_path / "last.pt")
    result = CliRunner().invoke(main, ["models", "fp16-copy", str(tmp_path / "last.pt"), str(tmp_path / "s.pt")])
    assert result.exit_code == 0 and "run snapshot" in result.stdout
    assert "no train_log.jsonl" in result.stderr and (tmp_path / "s.pt").exists()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "16", "--out",
               str(out)])
    assert "full_check passed" in log and "ArgMin x6" in log
    return out, log


def test_export_writes_the_artifacts_and_manifest(exported):
    out, _ = exported
    assert sorted(os.listdir(out)) == ["manifest.json", "original.onnx", "tmlp.onnx", "tmlp.pt", "val.npz"]
    manifest = json.load(open(out / "manifest.json"))
    for name in ("original.onnx", "tmlp.onnx", "tmlp.pt", "val.npz"):
        assert manifest["files"][name]["bytes"] == os.path.getsize(out / name)
    assert manifest["parity"]["tmlp.onnx"]["max_abs"] < 1e-3
    assert manifest["distillation"] is None and manifest["layer_plan"] is None
    meta = {p.key: p.value for p in onnx.load(str(out / "tmlp.onnx")).metadata_props}
    assert meta["tmlp.k"] == "16" and meta["tmlp.order"] == "1" and len(json.loads(meta["tmlp.layers"])) == 6
    assert meta["tmlp.fit"] == "lstsq"  # --fit auto: least squares for the (default) shared basis
    assert len(meta["tmlp.source_checkpoint_sha256"]) == 64 and meta["tmlp.version"]
    assert json.loads(meta["tmlp.preprocessing"])["input_size"] == [16, 16]


def test_the_saved_pytorch_model_is_the_exported_one(exported):
    """tmlp.pt holds the final T-MLP module: its logits match tmlp.onnx in onnxruntime and it names its blocks."""
    import onnxruntime as ort
    import torch

    from tmlp.stages import load_tmlp_model

    out, _ = exported
    model, layers = load_tmlp_model(str(out))
    manifest = json.load(open(out / "manifest.json"))
    assert layers == manifest["layers"] and len(layers) == 6
    assert all(type(model.get_submodule(f)).__name__.endswith("TaylorMLP") for f in layers)
    session = ort.InferenceSession(str(out / "tmlp.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, *session.get_inputs()[0].shape[1:])
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def test_bench_compares_three_models(exported):
    out, _ = exported
    text = _ok(["bench", "--run", str(out), "--runs", "10", "--warmup", "2", "--repeats", "2"])
    assert "| T-MLP |" in text and "| fp32 original |" in text
    bench = json.load(open(out / "bench.json"))
    rows = {r["variant"]: r for r in bench["rows"]}
    assert set(rows) == {"fp32 original", "int8 original (ORT dynamic)", "T-MLP", "T-MLP + int8 (rest of the model)",
                         "T-MLP + int8 (per-centre tensors too)"}
    fp32, tmlp = rows["fp32 original"], rows["T-MLP"]
    assert fp32["n_eval"] == tmlp["n_eval"] == 179  # the report split: the last 179 of the 359 validation images
    manifest = json.load(open(out / "manifest.json"))
    # onnxruntime's accuracy equals the PyTorch accuracy the export measured on the same images
    assert tmlp["accuracy"] == pytest.approx(manifest["pytorch_val_accuracy"]["tmlp"], abs=1 / 179)
    assert fp32["accuracy"] == pytest.approx(manifest["pytorch_val_accuracy"]["original"], abs=1 / 179)
    assert os.path.isfile(out / "bench.md")


def test_bench_reports_the_provider_that_ran(exported):
    """Asking for a provider this onnxruntime lacks is an error naming the ones it has, before anything runs;
    with --allow-fallback the table's header says which provider ran and what was asked for."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out, _ = exported
    result = CliRunner().invoke(main, ["bench", "--run", str(out), "--provider", "cuda"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1 and "CPUExecutionProvider" in err, err
    text = _ok(["bench", "--run", str(out), "--provider", "cuda", "--allow-fallback", "--runs", "2", "--warmup",
                "1", "--repeats", "1"])
    assert "onnxruntime" in text and "CPUExecutionProvider (asked for CUDAExecutionProvider: not available, fell " \
        "back with --allow-fallback)" in text
    bench = json.load(open(out / "bench.json"))
    assert bench["provider"] == "CPUExecutionProvider" and bench["requested_provider"] == "CUDAExecutionProvider"
    assert {r["provider"] for r in bench["rows"]} == {"CPUExecutionProvider"}


def test_runtime_runs_alone_in_an_empty_folder(exported, tmp_path):
    """As on a board: run.py, tmlp.onnx and val.npz copied into an empty folder, run there in isolated mode."""
    out, _ = exported
    board = tmp_path / "board"
    board.mkdir()
    for src in (RUN_PY, out / "tmlp.onnx", out / "val.npz"):
        shutil.copy(src, board)
    proc = subprocess.run([sys.executable, "-I", "run.py", "tmlp.onnx", "--data", "val.npz", "--runs", "5",
                           "--warmup", "1", "--batch", "4"], capture_output=True, text=True, cwd=board)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "tmlp.k = 16" in proc.stdout


def test_second_export_reuses_the_calibration_cache(trained, exported, tmp_path):
    _, first_log = exported
    out = tmp_path / "again"
    out.mkdir()
    (out / "tmlp.int8.onnx").write_bytes(b"stale: derived from an earlier export")
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "16", "--out",
               str(out)])
    assert "calibration cache hit" in log and "calibration cache hit" not in first_log
    assert not (out / "tmlp.int8.onnx").exists()
    # reproducible bytes: no temporary names, times or machine paths inside (torch.onnx's per-node stack traces
    # are dropped; the module scopes stay)
    for name in ("original.onnx", "tmlp.onnx"):
        assert (out / name).read_bytes() == (exported[0] / name).read_bytes(), name
    nodes = onnx.load(str(out / "tmlp.onnx")).graph.node
    keys = {p.key for n in nodes for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "namespace" in keys
    assert any("tmlp.taylor.SharedTaylorMLP" in p.value for n in nodes for p in n.metadata_props)
    a = np.load(exported[0] / "val.npz")["x"]
    assert np.array_equal(a, np.load(out / "val.npz")["x"])


def test_export_with_a_budget_and_distillation_records_both(trained, tmp_path):
    out = tmp_path / "planned"
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "8",
               "--max-acc-drop", "2", "--headroom", "0", "--plan-rank", "8,32", "--fit", "lstsq",
               "--distill-epochs", "1", "--no-finetune", "--out", str(out)])
    assert "least-squares fit (ridge 0.01)" in log
    assert "| block | choice |" in log and "| λ" in log and "distillation of the Taylor tensors" in log
    manifest = json.load(open(out / "manifest.json"))
    plan, distil = manifest["layer_plan"], manifest["distillation"]
    # judged by the drop predicted from the logit distance, at the rate fitted over every choice the plan measured
    assert plan["max_acc_drop_points"] == 2 and plan["predicted_drop_points"] <= 2 + 1e-9
    assert len(plan["rate"]["points"]) == len(plan["search"]) and all(s["logit_distance"] > 0 for s in plan["search"])
    assert distil["rate"]["source"] == "the trained model's own reading"  # one fixed epoch, no checks
    assert manifest["budget"]["judged_by"] == "drop predicted from the logit distance"
    assert manifest["layers"] == [f for f, c in plan["choice"].items() if c]
    assert {c["k"] for c in plan["choice"].values() if c} <= {2, 4, 8}
    assert {c["rank"] for c in plan["choice"].values() if c} <= {8, 32}
    model = onnx.load(out / "tmlp.onnx", load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["tmlp.plan"]) == plan["choice"]
    assert meta["tmlp.fit"] == "lstsq" and manifest["taylor_config"]["_data"]["fit"] == "lstsq"
    assert len(distil["kl_per_epoch"]) == 1 and manifest["pytorch_val_accuracy"]["tmlp"] == distil["accuracy_after"]


def test_block_k_gives_one_block_its_own_number_of_centres(trained, exported, tmp_path):
    out = tmp_path / "block-k"
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "16", "--block-k",
               "0=40", "--fit", "lstsq", "--distill-epochs", "1", "--distill-schedule", "cosine", "--out", str(out)])
    assert "--block-k: calibrating blocks.0.mlp with k=40" in log
    assert "calibration cache hit" in log  # the other blocks reuse the k=16 calibration
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["block_k"] == {"blocks.0.mlp": 40} and manifest["distillation"]["schedule"] == "cosine"
    model = onnx.load(str(out / "tmlp.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["tmlp.block_k"]) == {"blocks.0.mlp": 40} and meta["tmlp.k"] == "16"
    assert sum(n.op_type == "ArgMin" for n in model.graph.node) == 6
    centre_rows = sorted(int(i.dims[0]) for i in model.graph.initializer if i.name.endswith(".half_sq_norm"))
    assert centre_rows == [16] * 5 + [40], [(i.name, list(i.dims)) for i in model.graph.initializer]


def test_an_fp16_copy_of_a_checkpoint_exports_like_the_original(trained, exported, tmp_path):
    """`tmlp models fp16-copy` halves the file; `tmlp export --checkpoint` reads it back (as fp32) with the same
    accuracy to within one validation image."""
    half = tmp_path / "cifar_like_fp16.pt"
    _ok(["models", "fp16-copy", str(trained / "best.pt"), str(half)])
    assert half.stat().st_size < 0.6 * (trained / "best.pt").stat().st_size
    out = tmp_path / "from-half"
    _ok(["export", "--model", "test_vit", "--checkpoint", str(half), "--k", "16", "--out", str(out)])
    from_half = json.load(open(out / "manifest.json"))["pytorch_val_accuracy"]
    from_full = json.load(open(exported[0] / "manifest.json"))["pytorch_val_accuracy"]
    n = json.load(open(out / "manifest.json"))["n_val"]
    assert abs(from_half["original"] - from_full["original"]) <= 1 / n + 1e-9


def test_hidden_partition_is_recorded_and_exports_with_parity(trained, tmp_path):
    out = tmp_path / "hidden"
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "8", "--layers",
               "0,3", "--partition", "hidden", "--rank", "8", "--rank-out", "12", "--out", str(out)])
    assert "hidden partition" in log and "rank 8 in, 12 out" in log
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["taylor_config"]["_data"]["partition"] == "hidden"
    assert manifest["parity"]["tmlp.onnx"]["top1_agree"] == 1.0
    meta = {p.key: p.value for p in onnx.load(str(out / "tmlp.onnx")).metadata_props}
    assert meta["tmlp.partition"] == "hidden"
    assert (meta["tmlp.rank"], meta["tmlp.rank_out"]) == ("8", "12")
    assert manifest["taylor_config"]["_data"]["rank_out"] == 12


def test_exact_units_are_recorded_export_with_parity_and_stay_int8_beside_float_taylor_parts(trained, tmp_path):
    out = tmp_path / "exact"
    log = _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "8", "--layers",
               "1,4", "--rank", "8", "--exact-units", "64", "--out", str(out)])
    assert "64 exact hidden units" in log
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["taylor_config"]["_data"]["exact_units"] == 64
    assert manifest["parity"]["tmlp.onnx"]["top1_agree"] == 1.0
    meta = {p.key: p.value for p in onnx.load(str(out / "tmlp.onnx")).metadata_props}
    assert meta["tmlp.exact_units"] == "64"
    _ok(["bench", "--run", str(out), "--runs", "2", "--warmup", "1", "--repeats", "1"])
    ops = {name: collections.Counter(n.op_type for n in onnx.load(str(out / name)).graph.node)
           for name in ("tmlp.int8.onnx", "original.int8.onnx")}
    tmlp, original = ops["tmlp.int8.onnx"], ops["original.int8.onnx"]
    # the Taylor parts' MatMuls (projection to the cells' 16 directions, distances, V, S_c, Uᵀ) stay float: 5 per
    # block beside attention's; the exact units take the int8 MatMuls of the fc1/fc2 they stand in for
    assert tmlp["MatMul"] - original["MatMul"] == 10 and tmlp["ArgMin"] == 2
    assert tmlp["MatMulInteger"] == original["MatMulInteger"] > 0


def test_pareto_bench_builds_measures_and_draws_every_variant(exported, tmp_path):
    """tmlp bench --pareto on the tiny run: every variant is an ONNX file under the run folder, measured on val.npz;
    pareto.json has the documented fields, the front is non-dominated, pareto.png is drawn. Its T-MLP + tokens
    variants are the run's own T-MLP model (tmlp.pt) with token reduction: the Taylor blocks and TopK +
    GatherElements in one graph, and their static int8 leaves the Taylor blocks float."""
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    log = _ok(["bench", "--pareto", "--run", str(run), "--runs", "3", "--warmup", "1", "--repeats", "1",
               "--finetune-images", "32"])
    assert "pareto.json" in log
    result = json.load(open(run / "pareto.json"))
    names = [v["name"] for v in result["variants"]]
    assert names[:2] == ["fp32 original", "T-MLP"]
    for wanted in ("int8 static", "T-MLP + int8 static", "tokens 0.7", "T-MLP + tokens 0.7",
                   "T-MLP + tokens 0.7 + int8 static", "tokens 0.7 learned", "T-MLP + tokens 0.7 learned",
                   "prune MLPs", "low-rank MLPs"):
        assert wanted in names, names
    for v in result["variants"]:
        assert {"name", "methods", "onnx", "accuracy", "p50_ms", "p90_ms", "file_mb", "peak_rss_mib"} <= set(v)
        assert (run / v["onnx"]).is_file() and 0 <= v["accuracy"] <= 100 and v["p90_ms"] >= v["p50_ms"] > 0
    front = [v for v in result["variants"] if v["on_front"]]
    for v in front:  # nothing is both faster and more accurate than a point of the front
        assert not any(w["p50_ms"] < v["p50_ms"] and w["accuracy"] > v["accuracy"] for w in result["variants"])
    assert (run / "pareto.png").stat().st_size > 10_000
    assert len(result["mlp_keep"]) == 1 and 0 < result["mlp_keep"][0] < 1  # the T-MLP's share
    assert [w["budget_points"] for w in result["fastest_within"]] == [0.0, 0.5, 1.0, 2.0]
    assert "fastest variant within it" in (run / "pareto.md").read_text()
    by_name = {v["name"]: v for v in result["variants"]}
    for name in ("T-MLP + tokens 0.7", "T-MLP + tokens 0.7 learned"):
        ops = [n.op_type for n in onnx.load(str(run / by_name[name]["onnx"])).graph.node]
        assert ops.count("TopK") == 3 and "GatherElements" in ops and ops.count("ArgMin") == 6, name
        static = onnx.load(str(run / by_name[name + " + int8 static"]["onnx"])).graph.node
        assert sum(n.op_type == "ArgMin" for n in static) == 6 and any(n.op_type == "QuantizeLinear" for n in static)
    assert not (run / "pareto" / "tmlp-tokens").exists()  # built from tmlp.pt, no second export

    # several pruning / low-rank budgets: one pair of variants each, named by their share; the rest is reused
    built = {p.name: p.stat().st_mtime_ns for p in (run / "pareto").glob("*.onnx")}
    _ok(["bench", "--pareto", "--run", str(run), "--runs", "3", "--warmup", "1", "--repeats", "1",
         "--finetune-images", "32", "--mlp-keep", "0.5", "--mlp-keep", "0.25"])
    result = json.load(open(run / "pareto.json"))
    by_name = {v["name"]: v for v in result["variants"]}
    assert result["mlp_keep"] == [0.5, 0.25] and "prune MLPs" not in by_name
    for method in ("prune", "low-rank"):
        for keep, label in ((0.5, "50%"), (0.25, "25%")):
            for name in (f"{method} MLPs {label}", f"{method} MLPs {label} + int8 dynamic"):
                assert by_name[name]["mlp_keep"] == keep and (run / by_name[name]["onnx"]).is_file(), name
    assert by_name["prune MLPs 25%"]["file_mb"] < by_name["prune MLPs 50%"]["file_mb"]
    assert all((run / "pareto" / name).stat().st_mtime_ns == t for name, t in built.items())  # reused, not rebuilt


def test_export_with_token_reduction(trained, tmp_path):
    """tmlp export --token-keep 0.7 --token-policy learned: tmlp.onnx keeps fewer tokens after blocks 2, 3 and 4
    (TopK + GatherElements, parity checked like any export), original.onnx stays whole, the learned policy was
    trained on the images asked for, and the schedule is in the manifest."""
    out = tmp_path / "run"
    _ok(["export", "--model", "test_vit", "--checkpoint", str(trained / "best.pt"), "--k", "16", "--token-keep",
         "0.7", "--token-policy", "learned", "--token-policy-images", "32", "--out", str(out)])
    manifest = json.load(open(out / "manifest.json"))
    record = manifest["token_reduction"]
    assert record["layers"] == [2, 3, 4] and record["patch_tokens_per_block"] == [16, 16, 16, 12, 9, 7]
    assert record["policy"] == "learned" and record["policy_training"]["images"] == 32
    assert manifest["spec"]["_data"]["tokens"] == {"keep": 0.7, "layers": [], "fuse": True, "policy": "learned",
                                                   "policy_images": 32}
    assert manifest["parity"]["tmlp.onnx"]["top1_agree"] == 1.0
    tmlp_ops = [n.op_type for n in onnx.load(str(out / "tmlp.onnx")).graph.node]
    original_ops = {n.op_type for n in onnx.load(str(out / "original.onnx")).graph.node}
    assert tmlp_ops.count("TopK") == 3 and "GatherElements" in tmlp_ops and "TopK" not in original_ops
