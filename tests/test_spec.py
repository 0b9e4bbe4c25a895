"""The export spec: the one place defaults live, validated once, versioned, round-tripped through the manifest."""
import pytest

from tmlp.errors import TmlpError
from tmlp.spec import DistillSpec, ExportSpec, PlanSpec, QuantizeSpec, TokensSpec, SourceSpec, TaylorConfig, default_of


def test_flags_not_given_keep_the_spec_defaults():
    flags = {"calibration__k": None, "calibration__rank": None, "distill__epochs": None, "out_dir": None}
    assert ExportSpec.from_flags("deit_small", flags) == ExportSpec("deit_small")
    spec = ExportSpec.from_flags("deit_small", {"calibration__k": 90, "distill__finetune": True,
                                                "distill__epochs": 1})
    assert spec.calibration == TaylorConfig(k=90) and spec.distill == DistillSpec(epochs=1, finetune=True)


def test_the_budget_applies_unless_a_form_is_asked_for():
    """No form flags: 1 point, automatic distillation. A form flag (--k, --layers, ...) alone: that form, no budget;
    with --max-acc-drop too: the budget plans within it; --max-acc-drop none: no budget."""
    assert ExportSpec.from_flags("deit_small", {"source__checkpoint": "m.pt"}).plan.max_acc_drop == 1.0
    assert ExportSpec("deit_small").distill.epochs is None and ExportSpec("deit_small").distill.finetune
    assert ExportSpec.from_flags("deit_small", {"calibration__k": 50}).plan.max_acc_drop is None
    assert ExportSpec.from_flags("deit_small", {"blocks__layers": "0,1"}).form_fixed
    spec = ExportSpec.from_flags("deit_small", {"calibration__k": 50, "plan__max_acc_drop": 0.5})
    assert spec.plan.max_acc_drop == 0.5 and spec.calibration.k == 50
    assert ExportSpec.from_flags("deit_small", {"plan__max_acc_drop": "none"}).form_fixed
    # --replace-all plans k and rank under the budget, so a form flag beside it keeps the budget on
    spec = ExportSpec.from_flags("deit_small", {"calibration__k": 50, "plan__replace_all": True})
    assert spec.plan.max_acc_drop == 1.0 and spec.plan.replace_all and not spec.form_fixed


def test_python_defaults_are_the_cli_defaults():
    """TaylorConfig() is what `tmlp export` builds without flags: the deployable shared-basis form."""
    cfg = TaylorConfig()
    assert (cfg.k, cfg.basis, cfg.rank, cfg.fit, cfg.partition_rank) == (100, "shared", 32, "lstsq", 16)
    assert TaylorConfig(basis="dense", partition_rank=None).fit == "taylor"  # 'auto' resolved where it is made
    assert default_of("calibration.k") == 100 and default_of("distill.finetune_lr") == 2e-5


def test_spec_round_trips_and_refuses_other_versions_or_fields():
    spec = ExportSpec("vgg16", calibration=TaylorConfig(k=50), distill=DistillSpec(epochs=2, images=1000),
                      quantize=QuantizeSpec(mode="static", calibration="entropy"),
                      tokens=TokensSpec(keep=0.7, layers=(3, 6, 9), policy="learned", policy_images=500))
    assert ExportSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(TmlpError, match="this tmlp reads ExportSpec v11: export again"):
        ExportSpec.from_dict({**spec.to_dict(), "_version": 1})
    data = spec.to_dict()
    data["_data"] = {**data["_data"], "surprise": 1}
    with pytest.raises(TmlpError, match=r"fields \['surprise'\] missing or unknown"):
        ExportSpec.from_dict(data)


@pytest.mark.parametrize("make, message", [
    (lambda: ExportSpec(""), "--model must name a model"),
    (lambda: ExportSpec("deit_small", calibration=DistillSpec()), "must be a TaylorConfig"),
    (lambda: TaylorConfig(k=0), "--k must be a positive integer"),
    (lambda: DistillSpec(epochs=-1), "--distill-epochs must be >= 0"),
    (lambda: DistillSpec(check_images=0), "--check-images must be a positive integer"),
    (lambda: SourceSpec(choose_fraction=1.0), "--choose-fraction must be between 0 and 1"),
    (lambda: PlanSpec(headroom=-1), "--headroom must be >= 0 points"),
    (lambda: PlanSpec(max_acc_drop=None, replace_all=True), "--replace-all chooses k and rank under the"),
])
def test_values_are_validated_where_the_spec_is_made(make, message):
    with pytest.raises(TmlpError, match=message):
        make()
