"""Whole-model Taylor-aware fine-tuning (tmlp/finetune.py) and its place in the export (--finetune)."""
import copy
import json
import os

import pytest
import torch
from click.testing import CliRunner

from tmlp.cli import main
from tmlp.distill import taylor_blocks
from tmlp.errors import TmlpError
from tmlp.finetune import Recipe, finetune_
from tmlp.spec import DistillSpec
from tmlp.surgery import taylorize_
from tmlp.taylor import TaylorConfig
from tmlp.train import autocast, resolve_precision


def _labelled(digits, digits_spec, n=256):
    from tmlp.data import to_tensor

    x = to_tensor(digits.train.x[:n], digits_spec)
    y = torch.from_numpy(digits.train.y[:n]).long()
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]


@torch.no_grad()
def _objective(student, teacher, batches, label_weight=0.5):
    """The fine-tuning loss, KL to the teacher + label_weight x cross-entropy, over ``batches``."""
    from tmlp.distill import kl_to_teacher

    total = sum(float(kl_to_teacher(student(x), teacher(x)) + label_weight *
                      torch.nn.functional.cross_entropy(student(x), y)) * len(x) for x, y in batches)
    return total / sum(len(x) for x, _ in batches)


def test_finetune_trains_every_weight_and_lowers_its_loss(trained_tiny_vit, digits, digits_spec):
    teacher = trained_tiny_vit.eval()
    student = copy.deepcopy(teacher)
    batches = _labelled(digits, digits_spec)
    taylorize_(student, TaylorConfig(k=4), batches=lambda: (x for x, _ in batches), n_batches=len(batches),
               progress=False)
    attn_before = student.blocks[0].attn.qkv.weight.detach().clone()
    s_before = taylor_blocks(student)[0].s.clone()
    before = _objective(student, teacher, batches)
    losses = finetune_(student, teacher, lambda: iter(batches), len(batches), epochs=3, progress=False)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not torch.equal(student.blocks[0].attn.qkv.weight, attn_before)  # the rest of the network adapted
    assert not torch.equal(taylor_blocks(student)[0].s, s_before)  # and the Taylor tensors
    assert _objective(student, teacher, batches) < before
    block = taylor_blocks(student)[0]
    assert "s" in block._buffers and not block._parameters  # back to buffers: exports as before
    assert all(p.requires_grad for p in student.parameters())  # as taylorize_ left them


def test_bf16_finetune_lowers_the_fp32_loss_and_keeps_fp32_weights(trained_tiny_vit, digits, digits_spec):
    """--train-precision bf16: the steps run under bf16 autocast, the weights (and so the export) stay fp32, and the
    objective measured in fp32 still falls."""
    teacher = trained_tiny_vit.eval()
    student = copy.deepcopy(teacher)
    batches = _labelled(digits, digits_spec)
    taylorize_(student, TaylorConfig(k=4), batches=lambda: (x for x, _ in batches), n_batches=len(batches),
               progress=False)
    before = _objective(student, teacher, batches)
    losses = finetune_(student, teacher, lambda: iter(batches), len(batches), epochs=3, progress=False,
                       precision="bf16")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert _objective(student, teacher, batches) < before
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {b.dtype for b in taylor_blocks(student)[0].buffers()} == {torch.float32}


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    """--train-precision auto (the default): bf16 autocast on a CPU with AMX or AVX-512 BF16, fp32 elsewhere; an
    explicit choice is kept either way."""
    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert resolve_precision("auto", cpu) == expected
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
        assert isinstance(autocast(cpu, "auto"), torch.autocast) == (expected == "bf16")
    assert DistillSpec().precision == "auto"


def test_cosine_schedule_warms_up_then_decays_to_zero(trained_tiny_vit, digits, digits_spec, monkeypatch):
    from tmlp.distill import lr_factor

    f = lr_factor("cosine", 100, warmup=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
    assert lr_factor("constant", 100, 0.1)(0) == 1.0
    with pytest.raises(TmlpError, match="warm-up"):
        lr_factor("cosine", 100, warmup=1.0)
    # finetune_ steps the schedule once per optimizer step: the last step runs at (almost) zero learning rate
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    teacher = trained_tiny_vit.eval()
    student = copy.deepcopy(teacher)
    batches = _labelled(digits, digits_spec)
    taylorize_(student, TaylorConfig(k=4), batches=lambda: (x for x, _ in batches), n_batches=len(batches),
               progress=False)
    finetune_(student, teacher, lambda: iter(batches), len(batches), epochs=2, progress=False,
              recipe=Recipe(lr_taylor=1e-3, lr_model=2e-5, schedule="cosine", warmup=0.25))
    assert len(seen) == 8
    assert seen[0] == pytest.approx([5e-4, 1e-5])  # half-way up the 2-step warm-up
    assert seen[1] == pytest.approx([1e-3, 2e-5])
    assert seen[-1][0] < 1e-4 and seen[-1][0] < seen[-2][0]


def test_finetune_needs_taylor_blocks_and_sane_rates(trained_tiny_vit):
    with pytest.raises(TmlpError, match="no Taylor blocks"):
        finetune_(trained_tiny_vit, trained_tiny_vit, lambda: iter([]), 0, epochs=1)
    with pytest.raises(TmlpError, match="--finetune keeps the shared bases fixed"):
        DistillSpec(epochs=1, finetune=True, train_basis=True)
    assert DistillSpec(epochs=1, finetune=True, schedule="cosine").schedule == "cosine"
    with pytest.raises(TmlpError, match="--distill-images must be a positive integer"):
        DistillSpec(images=0)
    with pytest.raises(TmlpError, match="--train-precision must be one of"):
        DistillSpec(precision="fp16")


def _export(checkpoint, out, *extra):
    return CliRunner().invoke(main, ["export", "--model", "test_vit", "--checkpoint", checkpoint, "--k", "8",
                                     "--calib-images", "256", "--eval-images", "128", "--out", str(out), *extra])


def test_export_with_finetune_records_it_and_keeps_parity(trained_tiny_vit_path, tmp_path):
    out = tmp_path / "ft"
    result = _export(trained_tiny_vit_path, out, "--distill-epochs", "1", "--finetune", "--distill-images", "128",
                     "--train-precision", "bf16")
    assert result.exit_code == 0, result.output
    assert "fine-tuning of the whole model (KL + 0.5 x cross-entropy" in result.output
    assert "over 128 training images" in result.output
    manifest = json.load(open(out / "manifest.json"))
    record = manifest["distillation"]
    assert record["finetune"] and record["images"] == 128 and len(record["loss_per_epoch"]) == 1
    assert record["precision"] == "bf16"
    assert manifest["pytorch_val_accuracy"]["tmlp"] == record["accuracy_after"]
    assert manifest["spec"]["_data"]["distill"]["finetune"] is True
    assert manifest["parity"]["tmlp.onnx"]["max_abs"] < 1e-3  # the fine-tuned weights are what was exported


def test_a_failed_finetune_writes_nothing(trained_tiny_vit_path, tmp_path, monkeypatch):
    import tmlp.stages

    def diverge(*args, **kwargs):
        raise TmlpError("fine-tuning diverged (loss nan); lower --finetune-lr")
    monkeypatch.setattr(tmlp.stages, "finetune_", diverge)
    out = tmp_path / "ft"
    result = _export(trained_tiny_vit_path, out, "--distill-epochs", "1", "--finetune")
    assert result.exit_code == 2 and "diverged" in result.output
    assert not out.exists() or os.listdir(out) == []


def test_augmented_training_batches_are_seeded_and_the_same_for_every_rank_count(trained_tiny_vit_path):
    """--distill-augment: crops and flips are drawn per batch from the seed, so a run is repeatable, and for the
    whole batch before it is shared, so torchrun's ranks together see exactly the single-process batch."""
    from tmlp import stages
    from tmlp.distributed import World
    from tmlp.spec import ExportSpec, SourceSpec

    spec = ExportSpec("test_vit", source=SourceSpec(checkpoint=trained_tiny_vit_path, calib_images=64,
                                                    eval_images=64))
    loaded = stages.load(spec, lambda s: None, progress=False)
    plain = [x for x, _ in loaded.labelled_batches("train", 100)[0]()]
    gen, n = loaded.labelled_batches("train", 100, augment="crop_flip", seed=3)
    augmented = [(x, y) for x, y in gen()]
    assert n == 2 and [len(x) for x, _ in augmented] == [64, 36]
    assert all(x.shape == p.shape and not torch.equal(x, p) for (x, _), p in zip(augmented, plain))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(augmented, gen()))  # repeatable
    other = [x for x, _ in loaded.labelled_batches("train", 100, augment="crop_flip", seed=4)[0]()]
    assert not torch.equal(other[0], augmented[0][0])
    for size in (2, 3):
        shares = [list(loaded.labelled_batches("train", 100, share=World(rank, size, rank), augment="crop_flip",
                                               seed=3)[0]()) for rank in range(size)]
        for i, (x, y) in enumerate(augmented):  # rank r holds items r, r + size, ...
            rebuilt = torch.empty_like(x)
            labels = torch.empty_like(y)
            for rank in range(size):
                rebuilt[rank::size], labels[rank::size] = shares[rank][i]
            assert torch.equal(rebuilt, x) and torch.equal(labels, y)
    auto = next(loaded.labelled_batches("train", 64, augment="auto", seed=3)[0]())[0]
    assert torch.equal(auto, augmented[0][0]) == (loaded.data.augment == "crop_flip")
    with pytest.raises(TmlpError, match="--distill-augment"):
        DistillSpec(augment="mixup")


def test_averaged_checks_keep_the_mean_closest_to_the_original(trained_tiny_vit, digits, digits_spec):
    """tmlp.stages.AveragedChecks: each check adds the weights to their running mean and keeps the mean with the
    lowest KL to the original; a mean no closer than the start leaves the start in place."""
    from tmlp.stages import AveragedChecks

    teacher = trained_tiny_vit.eval()
    split = digits.val.subset(0, 64)
    noisy = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in teacher.state_dict().items()}
    exact = {k: v.clone() for k, v in teacher.state_dict().items()}

    student = copy.deepcopy(teacher)  # starts at the original: KL 0, nothing can beat it
    checks = AveragedChecks(student, teacher, split, digits_spec, every=64, log=lambda _: None)
    student.load_state_dict(noisy)
    assert checks(64) is False and checks.history[0]["choose_kl"] > 0
    assert checks.restore_best() == 0
    assert all(torch.equal(student.state_dict()[k], exact[k]) for k in exact)

    student.load_state_dict(noisy)  # starts away from the original; the checks' weights (the start is not one) are it
    checks = AveragedChecks(student, teacher, split, digits_spec, every=64, log=lambda _: None)
    start_kl = checks.best_kl
    student.load_state_dict(exact)
    checks(64)
    checks(128)
    assert [c["images"] for c in checks.history] == [64, 128]
    assert checks.history[0]["choose_kl"] < start_kl and checks.history[1]["choose_kl"] < start_kl
    assert checks.restore_best() == 64  # the first mean already was the original; the second, no closer, is not kept
    assert all(torch.allclose(student.state_dict()[k].float(), exact[k].float()) for k in exact)
