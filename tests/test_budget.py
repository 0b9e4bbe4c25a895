"""The accuracy budget held on the exported file: the default export measures tmlp.onnx in onnxruntime on the choose
split, backs off until the budget holds, never writes a model that breaks it, and reports on a split it never
chose on; automatic distillation stops when the choose-split accuracy stops improving and keeps the best weights."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from tmlp.budget import BudgetCheck, back_off, next_move, paired_standard_error
from tmlp.cli import main
from tmlp.distill import run_epochs
from tmlp.errors import TmlpError
from tmlp.plan import BlockOption, Plan
from tmlp.stages import ChooseSplitChecks

SMALL = ["--calib-images", "256", "--eval-images", "200", "--plan-k", "4,8", "--plan-rank", "8,16"]


def _export(checkpoint, out, *extra):
    return CliRunner().invoke(main, ["export", "--model", "test_vit", "--checkpoint", checkpoint, "--out", str(out),
                                     *SMALL, *extra])


def _blocks_in(path) -> int:
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return len(json.loads(meta["tmlp.layers"]))


MACS = {None: 100, BlockOption(4, 8): 10, BlockOption(8, 16): 20}  # per token: the MLP and two options


def test_back_off_makes_the_move_that_buys_the_most_kl_per_multiply_add():
    a, b = BlockOption(4, 8), BlockOption(8, 16)
    plan = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={f: MACS for f in "xyz"},
                sensitivity={"x": {a: 0.1, b: 0.01}, "y": {a: 0.5, b: 0.02}, "z": {a: 0.03, b: 0.3}},
                choice={"x": a, "y": b, "z": b}, build_block=lambda f, o: torch.nn.Identity())
    assert next_move(plan, ["x", "y", "z"]) == ("z", a)  # a is cheaper than b and 10x less sensitive: free
    assert next_move(plan, ["x", "y"]) == ("x", b)  # 0.09 nats for 10 MACs; y's MLP: 0.02 for 80
    plan.choice["z"] = a
    assert next_move(plan, ["x", "y", "z"]) == ("x", b)
    plan.choice["x"] = b
    assert next_move(plan, ["x", "y", "z"]) == ("z", None)  # only MLPs are left: 0.03 for 90 is the best of them
    assert next_move(None, ["x", "y", "z"]) == ("z", None)
    plan.build_block = None  # no calibrations to build from: blocks go straight back to their MLP
    plan.choice["y"] = a
    assert next_move(plan, ["x", "y"]) == ("y", None)
    # one option per block (the default): the most sensitive block's MLP comes back
    one = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={f: MACS for f in "xyz"},
               sensitivity={"x": {a: 0.1}, "y": {a: 0.5}, "z": {a: 0.03}}, choice=dict.fromkeys("xyz", a),
               build_block=lambda f, o: torch.nn.Identity())
    assert next_move(one, ["x", "y", "z"]) == ("y", None)


def test_with_replace_all_the_back_off_only_swaps_options_and_never_gives_an_mlp_back():
    a, b = BlockOption(4, 8), BlockOption(8, 16)
    plan = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={f: MACS for f in "xyz"},
                sensitivity={"x": {a: 0.1, b: 0.09}, "y": {a: 0.5, b: 0.45}, "z": {a: 0.03, b: 0.3}},
                choice={"x": a, "y": b, "z": a}, build_block=lambda f, o: torch.nn.Identity())
    # y's MLP buys 0.45 nats for 80 MACs, x's safer option 0.01 for 10: by default y's MLP comes back; with
    # --replace-all the only swap left (x to b) is made
    assert next_move(plan, ["x", "y", "z"]) == ("y", None)
    assert next_move(plan, ["x", "y", "z"], keep_mlps=False) == ("x", b)
    plan.choice["x"] = b
    assert next_move(plan, ["x", "y", "z"], keep_mlps=False) is None  # every block at its safest option
    assert next_move(None, ["x"], keep_mlps=False) is None
    model, original = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
    plan = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={"0": MACS}, sensitivity={"0": {a: 0.5, b: 0.1}},
                choice={"0": a}, build_block=lambda f, o: torch.nn.Identity())
    drops = iter([3.0])  # still broken after the swap: no move is left, and the block keeps its Taylor form
    with pytest.raises(TmlpError, match="no T-MLP model with every block replaced holds --max-acc-drop 1"):
        back_off(model, original, ["0"], plan, lambda m: next(drops), 1.0, lambda s: None, keep_mlps=False)
    assert plan.choice == {"0": b} and isinstance(model[0], torch.nn.Identity)


def test_back_off_swaps_in_the_safer_option_before_giving_the_mlp_back():
    a, b = BlockOption(4, 8), BlockOption(8, 16)
    model, original = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Sequential(torch.nn.Linear(2, 2))
    built = []
    plan = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={"0": MACS}, sensitivity={"0": {a: 0.5, b: 0.1}},
                choice={"0": a}, build_block=lambda f, o: built.append((f, o)) or torch.nn.Identity())
    drops = iter([0.5, 3.0])  # points: within budget after the swap
    assert back_off(model, original, ["0"], plan, lambda m: next(drops), 1.0, lambda s: None) == ["0"]
    assert built == [("0", b)] and plan.choice == {"0": b} and isinstance(model[0], torch.nn.Identity)
    drops = iter([3.0])  # still broken with the safest option: the block's MLP comes back, none is left
    with pytest.raises(TmlpError, match="least sensitive option"):
        back_off(model, original, ["0"], plan, lambda m: next(drops), 1.0, lambda s: None)
    assert plan.choice == {"0": None} and torch.equal(model[0].weight, original[0].weight)


def test_after_fine_tuning_the_back_off_gives_mlps_back_and_recovers_after_each_move():
    """Without swaps (the model was fine-tuned whole: a fresh option would be untrained) the most sensitive block goes
    straight back to its MLP; ``recover`` trains the model briefly after each move, before its drop is measured."""
    a, b = BlockOption(4, 8), BlockOption(8, 16)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity())
    original = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    plan = Plan(baseline=0.9, max_drop=0.01, errors={}, macs={f: MACS for f in "012"},
                sensitivity={"0": {a: 0.5, b: 0.1}, "1": {a: 0.3, b: 0.2}, "2": {a: 0.01, b: 0.02}},
                choice={"0": a, "1": a, "2": a}, build_block=lambda f, o: pytest.fail("no swap after fine-tuning"))
    assert next_move(plan, ["0", "1", "2"], swaps=False) == ("0", None)
    events = []
    drops = iter([1.5, 0.8])

    def drop(m):
        events.append("measure")
        return next(drops)
    assert back_off(model, original, ["0", "1", "2"], plan, drop, 1.0, lambda s: None, swaps=False,
                    recover=lambda m: events.append(("recover", sum(isinstance(x, torch.nn.Linear) for x in m)))
                    ) == ["2"]
    assert events == [("recover", 1), "measure", ("recover", 2), "measure"]
    assert plan.choice == {"0": None, "1": None, "2": a}
    assert torch.equal(model[0].weight, original[0].weight) and torch.equal(model[1].weight, original[1].weight)


def _correct(n_right: int, n: int = 1000) -> np.ndarray:
    return np.arange(n) < n_right


def test_budget_check_measures_drops_in_points():
    check = BudgetCheck(max_acc_drop=1.0, original_correct=_correct(800))
    check.measure(["a", "b"], _correct(780), 1.0)
    assert not check.holds() and abs(check.drop - 2.0) < 1e-9
    check.measure(["a"], _correct(795), 1.0)
    assert check.holds()
    record = check.to_dict()
    assert record["backed_off"] == ["b"] and record["split"] == "choose" and len(record["steps"]) == 2
    assert record["images"] == 1000 and record["margin_standard_errors"] == 0.0


def test_paired_standard_error_counts_only_the_images_the_models_disagree_on():
    original = _correct(800, 2500)
    same = original.copy()
    assert paired_standard_error(original, same) == 0.0
    flipped = original.copy()
    flipped[:250] = ~flipped[:250]  # disagree on 10% of 2,500 images, all of them lost: drop 10 points
    d = np.r_[np.ones(250), np.zeros(2250)]
    assert abs(paired_standard_error(original, flipped) - 100 * d.std(ddof=1) / 50) < 1e-9
    swapped = original.copy()
    swapped[[0, 1, 2, 3, 2000, 2001, 2002, 2003]] = ~swapped[[0, 1, 2, 3, 2000, 2001, 2002, 2003]]  # 4 lost, 4 won
    assert abs(paired_standard_error(original, swapped) - 100 * np.sqrt(8 / 2499) / 50) < 1e-9


def test_with_a_margin_a_drop_that_fits_only_by_chance_breaks_the_budget():
    """Drop 0.56 on 2,500 images where the models disagree on 250: 0.56 + 1 x 0.63 > 1 point."""
    original = _correct(1820, 2500)
    tmlp = original.copy()
    tmlp[:131] = False  # 131 lost ...
    tmlp[1820:1937] = True  # ... 117 won: 14 net, 0.56 points, 248 disagreements
    plain, strict = BudgetCheck(1.0, original), BudgetCheck(1.0, original, margin=1.0)
    for check in (plain, strict):
        check.measure(["a"], tmlp, 1.0)
    assert abs(plain.drop - 0.56) < 1e-9 and plain.holds()
    assert 0.6 < strict.standard_error < 0.65 and not strict.holds()
    assert strict.to_dict()["standard_error_points"] == strict.standard_error


def test_choose_split_checks_stop_at_the_first_check_without_gain_and_keep_the_best():
    model = torch.nn.Linear(2, 2)
    accuracies = iter([0.5, 0.6, 0.55])
    weights = []

    def accuracy(m):
        weights.append(m.weight.detach().clone())
        return next(accuracies)
    checks = ChooseSplitChecks(model, accuracy, start=0.4, every=30, log=lambda s: None)
    step_count = []

    def step(batch):
        with torch.no_grad():
            model.weight.add_(1.0)
        step_count.append(len(batch))
        return 0.0, len(batch)
    run_epochs(step, lambda: iter([torch.zeros(10)] * 10), 10, epochs=1, desc="t", metric="m", progress=False,
               check=checks)
    assert [h["images"] for h in checks.history] == [30, 60, 90] and len(step_count) == 9  # stopped after 9 batches
    assert checks.restore_best() == 60 and torch.equal(model.weight, weights[1])


def test_choose_split_checks_with_patience_ride_out_a_dip_and_stop_after_that_many_flat_checks():
    """Patience 2: a check below the best (chance, on a few thousand images) does not stop training; the second in a
    row does, and the best weights are the ones kept; a gain in between resets the count."""
    model = torch.nn.Linear(2, 2)
    accuracies = iter([0.5, 0.48, 0.55, 0.54, 0.55, 0.9])
    logged = []

    def accuracy(m):
        with torch.no_grad():
            m.weight.add_(1.0)
        return next(accuracies)
    checks = ChooseSplitChecks(model, accuracy, start=0.4, every=30, log=logged.append, patience=2)
    stops = [checks(30 * i) for i in range(1, 6)]
    assert stops == [False, False, False, False, True]  # 0.48 dips, 0.55 gains, then 0.54 and 0.55 (not above)
    assert "for 1 check(s))" in logged[3] and logged[4].endswith("for 2 check(s): stop)")
    start = model.weight.clone()
    assert checks.restore_best() == 90 and torch.allclose(model.weight, start - 2.0)


def test_choose_split_checks_stop_once_the_original_is_reached():
    model = torch.nn.Linear(2, 2)
    accuracies = iter([0.5, 0.61, 0.7])
    logged = []
    checks = ChooseSplitChecks(model, lambda m: next(accuracies), start=0.4, every=30, log=logged.append, target=0.6)
    assert not checks(30) and checks(60)  # 0.61 >= the original's 0.60: nothing left to recover
    assert checks.best == 0.61 and checks.restore_best() == 60 and "reached: stop" in logged[-1]


def test_run_epochs_checks_once_more_after_the_last_batch():
    class Record(list):
        every = 20

        def __call__(self, seen: int) -> bool:
            self.append(seen)
            return False
    seen = Record()
    run_epochs(lambda b: (0.0, len(b)), lambda: iter([torch.zeros(10)] * 5), 5, epochs=1, desc="t", metric="m",
               progress=False, check=seen)
    assert seen == [20, 40, 50]


def test_the_default_export_holds_the_budget_and_reports_on_another_split(trained_tiny_vit_path, tmp_path):
    """No form flags: the budget (1 point) applies, measured in onnxruntime on the choose split; val.npz holds the
    report split only."""
    out = tmp_path / "default"
    result = _export(trained_tiny_vit_path, out)
    assert result.exit_code == 0, result.output
    assert "budget check in onnxruntime on the choose split (100 images)" in result.output
    assert "on the report split (100 validation images, never used for a choice)" in result.output
    assert "expected speed-up" in result.output
    manifest = json.load(open(out / "manifest.json"))
    budget, report = manifest["budget"], manifest["report"]
    assert budget["holds"] and budget["drop_points"] <= 1.0 + 1e-9 and budget["images"] == 100
    assert report["images"] == 100 and len(np.load(out / "val.npz")["y"]) == 100
    assert manifest["spec"]["_data"]["plan"]["max_acc_drop"] == 1.0
    assert manifest["layers"] == budget["steps"][-1]["blocks"] and _blocks_in(out / "tmlp.onnx") == len(
        manifest["layers"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the staging folder is gone


def test_form_flags_turn_the_budget_off_unless_it_is_given(trained_tiny_vit_path, tmp_path):
    result = _export(trained_tiny_vit_path, tmp_path / "fixed", "--k", "8", "--layers", "0,1")
    assert result.exit_code == 0, result.output
    manifest = json.load(open(tmp_path / "fixed" / "manifest.json"))
    assert manifest["budget"] is None and manifest["layers"] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert manifest["report"]["images"] == 100  # reported all the same


def _pessimistic_onnxruntime(monkeypatch, points_per_block: float):
    """onnxruntime results of tmlp.onnx: the original's, with ``points_per_block`` per replaced block of the images
    it gets right turned wrong (original.onnx measured as it is)."""
    import tmlp.budget

    real = tmlp.budget.ort_logits

    def logits(path, split, preprocessing, *args, **kw):
        if os.path.basename(path) != "tmlp.onnx":
            return real(path, split, preprocessing, *args, **kw)
        result = real(os.path.join(os.path.dirname(path), "original.onnx"), split, preprocessing, *args, **kw).copy()
        y = np.asarray(split.y)
        wrong = np.flatnonzero(result.argmax(1) == y)[:round(points_per_block / 100 * _blocks_in(path) * len(y))]
        result[wrong, y[wrong]] = result[wrong].min(1) - 1  # the true class drops to the bottom
        return result
    monkeypatch.setattr(tmlp.budget, "ort_logits", logits)


def test_the_export_backs_off_until_the_budget_holds(trained_tiny_vit_path, tmp_path, monkeypatch):
    _pessimistic_onnxruntime(monkeypatch, points_per_block=0.5)
    out = tmp_path / "backed-off"
    result = _export(trained_tiny_vit_path, out, "--max-acc-drop", "1", "--headroom", "100", "--distill-epochs", "0",
                     "--judge-drop", "measured")
    assert result.exit_code == 0, result.output
    manifest = json.load(open(out / "manifest.json"))
    budget = manifest["budget"]
    assert budget["holds"] and len(manifest["layers"]) == 2 and _blocks_in(out / "tmlp.onnx") == 2
    counts = [len(s["blocks"]) for s in budget["steps"]]  # a block's safer option first, then its MLP back
    assert counts == sorted(counts, reverse=True) and set(counts) == set(range(2, counts[0] + 1))
    assert "backing off" in result.output
    plan = manifest["layer_plan"]["choice"]
    assert sorted(f for f, c in plan.items() if c) == sorted(manifest["layers"])


def test_the_plan_offers_exact_units_and_the_back_off_adds_them_before_an_mlp_comes_back(
        trained_tiny_vit_path, tmp_path, monkeypatch):
    """--plan-units 0,16: a block's less sensitive option keeps 16 hidden units exact, and the back-off moves blocks
    there before any MLP comes back; the manifest, the ONNX metadata and int8's float scopes follow each block's
    own count."""
    _pessimistic_onnxruntime(monkeypatch, points_per_block=0.5)
    out = tmp_path / "units"
    result = CliRunner().invoke(main, [
        "export", "--model", "test_vit", "--checkpoint", trained_tiny_vit_path, "--out", str(out), "--calib-images",
        "256", "--eval-images", "200", "--plan-k", "8", "--plan-rank", "8", "--plan-units", "0,16", "--max-acc-drop",
        "1", "--headroom", "100", "--distill-epochs", "0", "--judge-drop", "measured"])
    assert result.exit_code == 0, result.output
    assert "with 0, 16 exact hidden units for the plan" in result.output
    assert "takes a less sensitive option, k=8 r=8 +16 units" in result.output
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["budget"]["holds"] and manifest["parity"]["tmlp.onnx"]["top1_agree"] == 1.0
    units = manifest["exact_units"]
    assert list(units) == manifest["layers"] and set(units.values()) <= {0, 16} and 16 in units.values()
    plan = manifest["layer_plan"]["choice"]
    assert all(plan[f]["units"] == m for f, m in units.items())
    meta = {p.key: p.value for p in onnx.load(str(out / "tmlp.onnx"), load_external_data=False).metadata_props}
    recorded = meta["tmlp.exact_units"]
    assert (json.loads(recorded) == units) if len(set(units.values())) > 1 else recorded == "16"
    from tmlp.measure import exact_units
    from tmlp.taylor.exact import float_scopes

    assert exact_units(manifest) == units
    assert float_scopes(units) == [f"{f}.taylor" if m else f for f, m in units.items()]


def test_a_model_that_breaks_the_budget_is_never_written(trained_tiny_vit_path, tmp_path, monkeypatch):
    """onnxruntime loses 20 points per block: far more than the plan's rate predicts from the logit distance, so the
    measurement overrules the prediction (DropRate.judge) at every step, down to one block, and the export fails."""
    _pessimistic_onnxruntime(monkeypatch, points_per_block=20.0)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier file")
    result = _export(trained_tiny_vit_path, out, "--max-acc-drop", "1", "--headroom", "100", "--distill-epochs", "0")
    assert result.exit_code != 0 and "no T-MLP model holds --max-acc-drop 1" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()[-1]) < 300
    assert sorted(os.listdir(out)) == ["keep.txt"] and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_automatic_distillation_runs_only_when_needed_and_keeps_the_best_check(trained_tiny_vit_path):
    import dataclasses

    from tmlp import stages
    from tmlp.spec import DistillSpec, ExportSpec, SourceSpec, TaylorConfig

    spec = ExportSpec("test_vit", source=SourceSpec(checkpoint=trained_tiny_vit_path, calib_images=256,
                                                    eval_images=200),
                      calibration=TaylorConfig(k=8), distill=DistillSpec(check_images=128, images=512))
    logs = []
    loaded = stages.load(spec, logs.append, progress=False)
    selection = stages.select(loaded, spec)
    calibration = stages.calibrate_selection(loaded, selection, spec.calibration, 256, logs.append, False)
    built = stages.build(loaded, selection, calibration, spec.calibration, spec.source, logs.append)
    assert stages.distil(loaded, dataclasses.replace(built, choose=built.choose_original), spec, logs.append,
                         False).distillation is None and "no distillation needed" in logs[-1]
    behind = dataclasses.replace(built, choose=built.choose_original - 0.5)  # as if it had lost 50 points
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    out = stages.distil(loaded, behind, spec, logs.append, False)
    record = out.distillation
    assert record["epochs"] == "auto" and record["finetune"] and 1 <= len(record["checks"]) <= 4
    assert [c["images"] for c in record["checks"]][:3] == [128, 256, 384][:len(record["checks"])]
    best = max([behind.choose] + [c["choose_accuracy"] for c in record["checks"]])
    assert out.choose == best and record["choose_after"] == best
    changed = any(not torch.equal(before[k], v) for k, v in out.model.state_dict().items())
    assert changed == (record["images_seen"] > 0)  # the best check's weights, or the untouched start


def test_averaged_fine_tuning_keeps_the_mean_of_the_checks_closest_to_the_original(trained_tiny_vit_path):
    """--check-average: no early stop over --distill-images, the running mean of the weights measured at each check
    (accuracy and KL on the choose split), the lowest-KL mean (or the start) kept."""
    import dataclasses

    from tmlp import stages
    from tmlp.spec import DistillSpec, ExportSpec, SourceSpec, TaylorConfig

    spec = ExportSpec("test_vit", source=SourceSpec(checkpoint=trained_tiny_vit_path, calib_images=256,
                                                    eval_images=200),
                      calibration=TaylorConfig(k=8), distill=DistillSpec(check_images=128, images=512, average=True))
    assert ExportSpec.from_dict(spec.to_dict()).distill.average
    logs = []
    loaded = stages.load(spec, logs.append, progress=False)
    selection = stages.select(loaded, spec)
    calibration = stages.calibrate_selection(loaded, selection, spec.calibration, 256, logs.append, False)
    built = stages.build(loaded, selection, calibration, spec.calibration, spec.source, logs.append)
    behind = dataclasses.replace(built, choose=built.choose_original - 0.5)  # as if it had lost 50 points
    start = {k: v.clone() for k, v in built.model.state_dict().items()}
    out = stages.distil(loaded, behind, spec, logs.append, False)
    record = out.distillation
    assert record["average"] and record["images"] == 512
    averaged = record["whole_model_checks"] or record["checks"]  # no mean beat the start: Taylor tensors alone
    assert [c["images"] for c in averaged] == [128, 256, 384, 512]  # never stopped early
    assert all(c["choose_kl"] >= 0 for c in averaged)
    if record["whole_model_checks"]:
        assert "training the Taylor tensors alone" in "\n".join(logs)
    else:  # the kept mean is the one closest to the original, or the untouched start
        kept = [c for c in averaged if c["images"] == record["images_seen"]]
        assert not kept or kept[0]["choose_kl"] == min(c["choose_kl"] for c in averaged)
        assert any(not torch.equal(start[k], v) for k, v in out.model.state_dict().items()) == bool(kept)


def _plan_calibrations(checkpoint, tmp_path, monkeypatch, plan, counted: str):
    """The plan's calibrations of the tiny ViT at k = 8 (nothing cached), its selection, the log, and the calls of
    ``tmlp.calibration.calibrate``'s function ``counted``."""
    from tmlp import stages
    from tmlp.calibration import calibrate as calibrate_module
    from tmlp.spec import ExportSpec, SourceSpec, TaylorConfig

    monkeypatch.setenv("TMLP_CACHE", str(tmp_path / "cache"))
    spec = ExportSpec("test_vit", source=SourceSpec(checkpoint=checkpoint, calib_images=256, eval_images=200),
                      calibration=TaylorConfig(k=8), plan=plan)
    loaded = stages.load(spec, lambda s: None, progress=False)
    selection = stages.select(loaded, spec)
    calls, real, logs = [], getattr(calibrate_module, counted), []
    monkeypatch.setattr(calibrate_module, counted, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return stages.calibrate_plan_options(loaded, selection, spec, logs.append, False), selection, logs, calls


def test_the_plan_calibrates_every_k_in_one_pass_over_the_data(trained_tiny_vit_path, tmp_path, monkeypatch):
    from tmlp.spec import PlanSpec

    calibrations, selection, logs, passes = _plan_calibrations(trained_tiny_vit_path, tmp_path, monkeypatch,
                                                               PlanSpec(k_choices=(2, 4, 8)), "collect_inputs")
    assert sorted(calibrations) == [(2, 0), (4, 0), (8, 0)] and len(passes) == 1
    assert "at k=2, 4, 8 for the plan" in logs[0]
    assert all(set(c) == set(selection.fqns) for c in calibrations.values())
    assert [len(calibrations[k, 0][selection.fqns[0]].centres) for k in (2, 4, 8)] == [2, 4, 8]


def test_the_plan_calibrates_each_unit_count_on_one_k_means(trained_tiny_vit_path, tmp_path, monkeypatch):
    """--plan-units: one calibration per count of exact units, on the same centres (one K-means per k), each
    with its own units and tensors fitted to F − E."""
    from tmlp import stages
    from tmlp.spec import PlanSpec, TaylorConfig

    plan = PlanSpec(unit_choices=(0, 4, 16))
    assert stages.plan_options(plan, TaylorConfig(k=8), 10_000) == [
        BlockOption(8, 32, 0), BlockOption(8, 32, 4), BlockOption(8, 32, 16)]
    calibrations, selection, logs, runs = _plan_calibrations(trained_tiny_vit_path, tmp_path, monkeypatch, plan,
                                                             "partition_kmeans")
    assert sorted(calibrations) == [(8, 0), (8, 4), (8, 16)] and len(runs) == len(selection.fqns)
    assert "at k=8 with 0, 4, 16 exact hidden units for the plan" in logs[0]
    fqn = selection.fqns[0]
    plain, few, many = (calibrations[8, m][fqn] for m in (0, 4, 16))
    assert plain.units is None and len(few.units) == 4 and len(many.units) == 16
    assert set(few.units.tolist()) <= set(many.units.tolist())  # the same scores, the top 4 of the top 16
    assert torch.equal(plain.centres, many.centres) and not torch.equal(plain.derivatives.s, many.derivatives.s)


def test_replace_all_keeps_every_block_replaced_under_the_budget(trained_tiny_vit_path, tmp_path):
    out = tmp_path / "all"
    result = _export(trained_tiny_vit_path, out, "--replace-all", "--layers", "0,1")
    assert result.exit_code == 0, result.output
    assert "every block replaced (--replace-all)" in result.output
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["spec"]["_data"]["plan"]["replace_all"] and manifest["budget"]["holds"]
    assert manifest["layers"] == ["blocks.0.mlp", "blocks.1.mlp"] and _blocks_in(out / "tmlp.onnx") == 2
    assert all(manifest["layer_plan"]["choice"].values())


def test_after_fine_tuning_the_export_gives_mlps_back_and_trains_after_each_move(trained_tiny_vit_path, tmp_path,
                                                                                  monkeypatch):
    """The model was fine-tuned whole and onnxruntime still breaks the budget: blocks go straight back to their MLP
    (no swap to an untrained option) and, with --recover-images, the model is fine-tuned briefly after each move."""
    _pessimistic_onnxruntime(monkeypatch, points_per_block=0.5)
    out = tmp_path / "recovered"
    result = _export(trained_tiny_vit_path, out, "--max-acc-drop", "1", "--headroom", "100", "--distill-epochs", "1",
                     "--distill-images", "256", "--recover-images", "128", "--judge-drop", "measured")
    assert result.exit_code == 0, result.output
    assert "fine-tuning of the whole model" in result.output
    assert "is its original MLP again" in result.output and "takes a less sensitive option" not in result.output
    assert "    recovery after 64 training images: choose-split accuracy" in result.output
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["budget"]["holds"] and len(manifest["layers"]) == 2 and _blocks_in(out / "tmlp.onnx") == 2
    plain = _export(trained_tiny_vit_path, tmp_path / "plain", "--max-acc-drop", "1", "--headroom", "100",
                    "--distill-epochs", "1", "--distill-images", "256",
                    "--judge-drop", "measured")  # the default: no recovery, still no swap
    assert plain.exit_code == 0, plain.output
    assert "is its original MLP again" in plain.output and "recovery" not in plain.output
    assert "takes a less sensitive option" not in plain.output


def test_a_budget_margin_backs_off_further_than_the_drop_alone(trained_tiny_vit_path, tmp_path, monkeypatch):
    """1 point lost per block on 100 images: the drop alone fits a 3-point budget with 3 blocks; with one standard
    error of margin (sqrt(b) points for b blocks here) only 1 block stays (2 + 1.4 > 3)."""
    _pessimistic_onnxruntime(monkeypatch, points_per_block=1.0)
    common = ("--max-acc-drop", "3", "--headroom", "100", "--distill-epochs", "0", "--judge-drop", "measured")
    kept = {}
    for margin in ("0", "1"):
        out = tmp_path / f"margin-{margin}"
        result = _export(trained_tiny_vit_path, out, *common, "--budget-margin", margin)
        assert result.exit_code == 0, result.output
        budget = json.load(open(out / "manifest.json"))["budget"]
        assert budget["holds"] and budget["margin_standard_errors"] == float(margin)
        kept[margin] = len(budget["steps"][-1]["blocks"])
    assert kept == {"0": 3, "1": 1}
    assert "+ 1 x 1.00 standard error, budget 3: holds" in result.output
