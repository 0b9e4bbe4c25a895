"""The ``tmlp`` command line: train, export, bench, data, models."""
from __future__ import annotations

import functools
import glob
import json
import os
import sys

import click

from tmlp import __version__
from tmlp.errors import TmlpError
from tmlp.spec import DISTILL_AUGMENTS, DROP_JUDGES, TRAIN_PRECISIONS


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every temporary file and folder is cleaned up."""


def _terminate(signum, frame):
    raise Terminated()


def _signal_in_chain(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Terminated that ``err`` was raised while handling, if any."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, (KeyboardInterrupt, Terminated)):
            return err
        err, seen = err.__context__, seen + 1
    return None


def _stopped(err: BaseException) -> None:
    what = "terminated" if isinstance(err, Terminated) else "interrupted"
    click.echo(f"{what}; finished files are intact, nothing partial was left under a final name", err=True)
    sys.exit(143 if isinstance(err, Terminated) else 130)


def user_errors(fn):
    """Turn a TmlpError (bad input) into ``error: <one line>`` on stderr and exit status 2; Ctrl-C (130) and SIGTERM
    (143) unwind like an error, so that nothing partial or temporary is left behind."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except TmlpError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, Terminated) as err:
            _stopped(err)
        except Exception as err:  # a library that turned the signal into its own error while unwinding
            cause = _signal_in_chain(err)
            if cause is None:
                raise
            _stopped(cause)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


class OneLineErrors(click.Group):
    """A click group whose usage errors (a bad value, a missing option, an unknown flag) are one line on stderr,
    ``error: <what click says> (see <command> --help)``, exit status 2, like every other tmlp error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # `tmlp` or `tmlp models` alone: the help text
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "tmlp"
            click.echo(f"error: {err.format_message()} (see {where} --help)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tmlp")
def main() -> None:
    """T-MLP: replace the MLP blocks of a trained network by Taylor expansions around K-means centres, export the
    result to ONNX and measure it against the original and int8 with onnxruntime.

    \b
    Typical use:
      tmlp export --model deit_small --k 100     # calibrate, write runs/<model>-<data>/{original,tmlp}.onnx
      tmlp bench --provider cpu                  # original vs T-MLP vs int8: accuracy, latency, memory, size
      python runtime/run.py runs/.../tmlp.onnx --data runs/.../val.npz   # the same measurement on a device
    """


# ---------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--model", required=True, help="deit_small, deit_tiny, vgg16 or a timm model name.")
@click.option("--dataset", default="digits", show_default=True,
              help="digits, cifar10, cifar100, npz:PATH (file, or folder with train.npz/val.npz), imagefolder:PATH.")
@click.option("--path", "out_dir", default=None, help="Run folder for last.pt/best.pt/train_log.jsonl "
              "[default: runs/train-<model>-<dataset>]. An interrupted run in it resumes.")
@click.option("--epoch", "epochs", type=click.IntRange(1), default=200, show_default=True, help="Epochs to train.")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 0.05 for sgd, 5e-4 for adamw].")
@click.option("--batch_size", "--batch-size", "batch_size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--weight_decay", "--weight-decay", "weight_decay", type=float, default=None,
              help="[default: 1e-4 for sgd, 0.05 for adamw]")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd: momentum 0.95, Nesterov (the CIFAR recipe); adamw for ViTs from scratch.")
@click.option("--warmup", "warmup_epochs", type=float, default=None,
              help="Linear warm-up epochs before the cosine decay [default: 0 for sgd, 1 for adamw].")
@click.option("--clip-grad", type=float, default=None, help="Clip the gradient norm (1.0 helps ViTs).")
@click.option("--augment", type=click.Choice(["auto", "crop_flip", "crop", "none"]), default="auto", show_default=True,
              help="auto: random crop + flip for photos, crop only for digits.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 autocast is faster only where the CPU/GPU has fast bf16 matmuls: measure.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of the training data held out for validation (data sets without their own split).")
@click.option("--patience", type=click.IntRange(1), default=20, show_default=True,
              help="Stop after this many epochs without a better validation accuracy.")
@click.option("--eval-every", type=click.IntRange(1), default=10, show_default=True, help="Print validation accuracy every N epochs.")
@click.option("--img-size", type=click.IntRange(1, 4096), default=None, help="Model input size (ViT img_size; images are resized).")
@click.option("--patch-size", type=click.IntRange(1, 4096), default=None, help="ViT patch size.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@click.option("--num_workers", "--num-workers", "num_workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch CPU threads [default: torch's choice].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--data-root", default=None, help="Where cifar10/100 live or download to [default: $TMLP_DATA or "
              "~/.cache/tmlp/data].")
@click.option("--download/--no-download", default=False, help="Download cifar10/100 if missing.")
@click.option("--fp16-copy", default=None, help="Also write the best checkpoint in fp16 to this path (for the repo).")
@click.option("--init", "init_from", default=None, help="Start from this checkpoint's weights (same model and "
              "config, or a ViT at another --img-size: position embeddings resampled; fp16 copies too) with a fresh "
              "optimizer and schedule; a run snapshot (`tmlp models fp16-copy RUN/last.pt`) made with the same options "
              "continues its run where it stood.")
@click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Label smoothing of the cross-entropy loss.")
@click.option("--drop-path", "drop_path_rate", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="Stochastic depth rate for timm ViTs [default: the model's, 0].")
@user_errors
def train(model, dataset, out_dir, epochs, lr, batch_size, weight_decay, optimizer, warmup_epochs, clip_grad, augment,
          precision, val_fraction, patience, eval_every, img_size, patch_size, device, num_workers, threads, seed,
          data_root, download, fp16_copy, init_from, label_smoothing, drop_path_rate) -> None:
    """Train a model from scratch, keeping the best checkpoint on a held-out validation split.

    Checkpoints (last.pt every epoch and every 5 minutes, best.pt on each improvement) make the run resumable:
    run the same command again after an interruption.
    """
    from tmlp.io import check_file_target
    from tmlp.train import TrainConfig, train as run_train

    if fp16_copy:
        check_file_target(fp16_copy, "--fp16-copy")  # before hours of training, not after

    adam = optimizer == "adamw"
    model_config = {k: v for k, v in {"img_size": img_size, "patch_size": patch_size,
                                      "drop_path_rate": drop_path_rate}.items() if v is not None}
    cfg = TrainConfig(model=model, dataset=dataset, model_config=model_config, epochs=epochs,
                      lr=lr if lr is not None else (5e-4 if adam else 0.05), batch_size=batch_size,
                      weight_decay=weight_decay if weight_decay is not None else (0.05 if adam else 1e-4),
                      optimizer=optimizer, warmup_epochs=warmup_epochs if warmup_epochs is not None else
                      (1.0 if adam else 0.0), clip_grad=clip_grad, augment=augment, precision=precision, val_fraction=val_fraction,
                      patience=patience, eval_every=eval_every, seed=seed, num_workers=num_workers, device=device,
                      threads=threads, data_root=data_root, download=download, label_smoothing=label_smoothing)
    out_dir = out_dir or os.path.join("runs", f"train-{model}-{dataset.replace(':', '-').replace('/', '_')}")
    summary = run_train(cfg, out_dir, init_from=init_from)
    from tmlp.distributed import world

    if not world().main:  # under torchrun rank 0 reports and writes the fp16 copy
        return
    click.echo(f"best validation accuracy {100 * summary['best_acc']:.2f}% at epoch {summary['best_epoch']}; "
               f"checkpoint {summary['checkpoint']}")
    if fp16_copy:
        write_fp16_copy(summary["checkpoint"], fp16_copy)


def write_fp16_copy(src: str, dst: str) -> None:
    """An fp16 copy of checkpoint ``src`` at ``dst`` (same model, config and training record; half the bytes)."""
    from tmlp.models import COMMIT_FILE_MB, load_checkpoint, save_checkpoint

    net, payload = load_checkpoint(src)
    extra = {k: v for k, v in payload.items() if k not in ("format", "version", "model", "config", "state_dict")}
    save_checkpoint(dst, net, payload["model"], payload["config"], extra, half=True, max_file_mb=COMMIT_FILE_MB)
    click.echo(f"fp16 copy: {dst} ({describe_files(dst)}, from {os.path.getsize(src) / 1e6:.1f} MB)")


def describe_files(path: str) -> str:
    """'42.7 MB', or '67.1 MB in 2 files (x.pt, x.part1.pt)' for a sharded checkpoint."""
    stem = path[:-3] if path.endswith(".pt") else path
    files = [path] + sorted(glob.glob(glob.escape(stem) + ".part*.pt"))
    size = sum(os.path.getsize(f) for f in files) / 1e6
    names = ", ".join(os.path.basename(f) for f in files)
    return f"{size:.1f} MB" if len(files) == 1 else f"{size:.1f} MB in {len(files)} files ({names})"


# ---------------------------------------------------------------------------------------------------------------------
def spec_option(*decls: str, field: str, help: str, none_means: str = "none", **kwargs):
    """A click option for spec field ``section.field``: its value reaches ExportSpec.from_flags as
    ``section__field``, its default is the spec's (None here means "not given"), and --help shows that default
    (``none_means`` for a default of None)."""
    from tmlp.spec import default_of

    default = default_of(field)
    shown = none_means if default is None else default
    return click.option(*decls, field.replace(".", "__"), default=None, help=f"{help}  [default: {shown}]", **kwargs)


def _none_if_zero(ctx, param, value):
    return None if value == 0 else value


class _NumberOrWord(click.ParamType):
    """A number, or ``word`` meaning None (the spec's 'not set'): --max-acc-drop none, --distill-epochs auto."""

    def __init__(self, convert: type, word: str, meaning: object) -> None:
        self.cast, self.word, self.meaning = convert, word, meaning
        self.name = f"{convert.__name__}|{word}"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == self.word:
            return self.meaning
        try:
            return self.cast(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number or '{self.word}'", param, ctx)


BUDGET = _NumberOrWord(float, "none", "none")  # the spec's NO_BUDGET
EPOCHS = _NumberOrWord(int, "auto", None)


@main.command()
@click.option("--model", required=True, help="deit_small, deit_tiny, vgg16 or a timm model name.")
@spec_option("--k", field="calibration.k", type=int, help="Expansion points (K-means centres) per block.")
@spec_option("--order", field="calibration.order", type=click.IntRange(0, 2),
             help="Taylor order: 0 (value), 1 (value + Jacobian), 2 (+ diagonal Hessian).")
@spec_option("--hessian", field="calibration.hessian", type=click.Choice(["diag", "full"]),
             help="Second-order term; 'full' is refused with its storage figure.")
@spec_option("--basis", field="calibration.basis", type=click.Choice(["shared", "dense"]),
             help="shared: J_c ≈ U S_c Vᵀ with rank --rank (the deployable form); dense: a full Jacobian per centre "
                  "(k*d_out*d_in floats: slow and large, the reference).")
@spec_option("--rank", field="calibration.rank", type=int,
             help="Rank r of the shared basis (of V, the input side; also of U unless --rank-out is given).")
@spec_option("--rank-out", field="calibration.rank_out", type=click.IntRange(min=0), callback=_none_if_zero,
             help="Rank of U, the output side of the shared basis, when it should differ from --rank (0: same as "
                  "--rank). S_c becomes [rank-out, rank]. On the CIFAR DeiT-Small's blocks.5.mlp, 32 in / 48 out gave "
                  "block error 0.149 at 10.7x the fp32 MLP's speed, 32/32 gave 0.158 at 14.5x (bench/block.py); the "
                  "whole model did not gain from it.")
@spec_option("--basis-source", field="calibration.basis_source", type=click.Choice(["data", "jacobian"]),
             help="Shared basis from PCA of the block's input/output deviations, or from the stacked Jacobians.")
@spec_option("--fit", field="calibration.fit", type=click.Choice(["auto", "taylor", "lstsq"]),
             help="Per-centre tensors: 'taylor' the derivatives at each centre; 'lstsq' (shared basis) refit to the "
                  "block's outputs over every calibration token, one more pass over the data (same graph, same "
                  "speed; CIFAR DeiT-Small, all 12 blocks: 57.86 -> 59.64% before distillation); 'auto' is lstsq "
                  "for --basis shared and taylor for dense.")
@spec_option("--fit-ridge", field="calibration.fit_ridge", type=float,
             help="Ridge of --fit lstsq towards the Taylor values, relative to the features' variance.")
@spec_option("--partition", field="calibration.partition", type=click.Choice(["auto", "input", "hidden"]),
             help="Which centre serves a token: 'input' the nearest in the block's input space; 'hidden' the nearest "
                  "after the block's first Linear layer (K-means on its pre-activations, so cells follow where the "
                  "activation bends; same graph, same speed); 'auto' hidden wherever that layer keeps all the "
                  "block's input directions (a transformer MLP), input elsewhere (VGG-16's head).")
@spec_option("--partition-rank", field="calibration.partition_rank", type=click.IntRange(min=0),
             callback=_none_if_zero,
             help="Find the cells, and assign tokens, in this many leading principal directions of the partition's "
                  "coordinates (0: all input dimensions). Shrinks the nearest-centre MatMul, the largest cost of a "
                  "shared-basis block, from d*k to q*(d+k) multiply-adds per token; on the CIFAR DeiT-Small q=16 "
                  "cells fit as well as full ones (bench/fit_error.py).")
@spec_option("--exact-units", field="calibration.exact_units", type=click.IntRange(min=0),
             help="Keep this many hidden units per block exact beside the Taylor block (the units a piecewise-linear "
                  "block serves worst; the block is calibrated on the rest; two-layer MLPs only). On the CIFAR "
                  "DeiT-Small, blocks 1-11 before training: 256 units took the report-split drop from -2.00 to "
                  "-0.36 points at 1.72x fp32 instead of 2.13x (bench/results/exact-units).")
@spec_option("--seed", field="calibration.seed", type=click.IntRange(0, 2**32 - 1), help="K-means seed.")
@spec_option("--layers", field="blocks.layers",
             help="Blocks to replace: 'all', indices (0,1,2) or module names (blocks.0.mlp,blocks.5.mlp).")
@spec_option("--block-k", field="blocks.block_k",
             help="Per-block k overriding --k, e.g. 0=400 (block index, as --layers) or blocks.0.mlp=400: more "
                  "centres where one block carries most of the error.")
@spec_option("--dataset", field="source.dataset", help="Calibration/validation data (none: the checkpoint's).")
@spec_option("--checkpoint", field="source.checkpoint", type=click.Path(dir_okay=False),
             help="A checkpoint from `tmlp train`. Without it, the embedded default (the model trained on digits "
                  "once, then cached) is used.")
@click.option("--pretrained", "source__pretrained", is_flag=True, default=None,
              help="Use timm's pretrained weights (needs network access).")
@spec_option("--calib-images", field="source.calib_images", type=int,
             help="Training images streamed through the model for calibration.")
@spec_option("--eval-images", field="source.eval_images", type=int,
             help="Validation images used (the first ones), split into the choose and the report split.")
@spec_option("--data-root", field="source.data_root", help="Where cifar10/100 live (none: $TMLP_DATA or "
             "~/.cache/tmlp/data).")
@spec_option("--distill-epochs", field="distill.epochs", type=EPOCHS, none_means="auto",
             help="Training after calibration (fine-tuning, or with --no-finetune logit distillation of the Taylor "
                  "tensors alone): 'auto' runs it only when the budget needs it, streaming up to one pass over "
                  "the training images and stopping when the choose-split accuracy stops improving; N: exactly N "
                  "passes over --distill-images; 0: never. Prints the accuracy before and after.")
@spec_option("--distill-lr", field="distill.lr", type=float,
             help="AdamW learning rate of distillation (digits, k=10, 3 epochs: 1e-3 gave 87.7 -> 91.4%, 1e-4 88.6%).")
@click.option("--distill-basis", "distill__train_basis", is_flag=True, default=None,
              help="Also train the shared bases U and V.")
@spec_option("--distill-schedule", field="distill.schedule", type=click.Choice(["constant", "cosine"]),
             help="Learning rates of distillation and fine-tuning: constant, or cosine-decayed to 0 over the "
                  "streamed images (fine-tuning: after a 5% linear warm-up; a check that stops early stops it "
                  "part-way). Measured: no gain (converged CIFAR DeiT-Small, 11 blocks, 30,720 images "
                  "fine-tuned: report split 70.24% cosine, 70.72% constant at the same point; "
                  "bench/results/finetune-selection).")
@spec_option("--distill-images", field="distill.images", type=int,
             help="Training images distillation or fine-tuning streams through per epoch (none: --calib-images).")
@click.option("--finetune/--no-finetune", "distill__finetune", default=None,
              help="Train every weight of the network with the Taylor blocks in place (not only the Taylor tensors): "
                   "KL to the original's logits + 0.5 x cross-entropy to the labels, --distill-lr for the Taylor "
                   "tensors, --finetune-lr for the rest. --no-finetune distils the Taylor tensors alone.  "
                   "[default: finetune]")
@spec_option("--finetune-lr", field="distill.finetune_lr", type=float,
             help="AdamW learning rate of the non-Taylor weights under --finetune.")
@spec_option("--train-precision", field="distill.precision", type=click.Choice(list(TRAIN_PRECISIONS)),
             help="Precision of the distillation / fine-tuning steps: bf16 autocast is faster only where the CPU has "
                  "native bf16 matmuls (AMX, AVX512-BF16); auto uses it there and fp32 elsewhere. The accuracy checks "
                  "and the exported model stay fp32.")
@spec_option("--distill-augment", field="distill.augment", type=click.Choice(list(DISTILL_AUGMENTS)),
             help="Random crops (zero padding 4) and horizontal flips of the training images distillation and "
                  "fine-tuning see, the same for the original teacher and the T-MLP student; auto: the data set's "
                  "(crop + flip for photos, crop for digits); none: the images as they are.")
@spec_option("--max-acc-drop", field="plan.max_acc_drop", type=BUDGET,
             help="Accuracy budget in points of top-1 accuracy, measured on the final T-MLP model (after "
                  "distillation, in onnxruntime) on the choose split of the validation images: the export chooses "
                  "per block whether to replace it and with which k and rank, and backs off until the budget holds; "
                  "nothing is written otherwise. Applies by default; giving a form flag (--k, --layers, --rank, ...) "
                  "without it turns it off, and 'none' turns it off: every selected block is replaced as asked.")
@spec_option("--headroom", field="plan.headroom", type=float,
             help="Points the plan may lose beyond the budget before distillation, when distillation runs (it wins "
                  "them back, or the export backs off).")
@spec_option("--budget-margin", field="plan.margin", type=float,
             help="Standard errors of the measured drop (paired, from the choose-split images on which the two "
                  "models disagree) that must fit within the budget besides the drop: the choose split also picked "
                  "the plan and the fine-tuning stop, so a drop that fits by chance flatters the model (CIFAR-10 "
                  "DeiT-Small: 1.1-2.4 points; bench/results/default-variants). 0: the drop alone.")
@spec_option("--judge-drop", field="plan.judge", type=click.Choice(list(DROP_JUDGES)),
             help="How the plan, the distillation decision and the budget check judge a model's drop on the choose "
                  "split. predicted: from its logit distance to the original, at a rate fitted over every model "
                  "measured (the plan's choices, or a training's checks); measured: its top-1 drop on those "
                  "2,500 images, which reads within +-0.5 points, so the cheapest reading that fits is a lucky one "
                  "(bench/results/kl-rule).")
@click.option("--replace-all", "plan__replace_all", is_flag=True, default=None,
              help="Under the budget, replace every selected block: the plan chooses only k and rank per block, "
                   "the back-off only moves blocks to safer options, and the export fails rather than give a "
                   "block its MLP back. Each block is offered only its calibrated k and rank unless --plan-k/"
                   "--plan-rank offer more, so without them a broken budget fails at once.  [default: blocks may "
                   "keep their MLP]")
@spec_option("--choose-fraction", field="source.choose_fraction", type=float,
             help="Share of the validation images that choices (plan, distillation stop, budget check) are made on; "
                  "the rest is the report split, written to val.npz and never used for a choice.")
@spec_option("--check-images", field="distill.check_images", type=int,
             help="With --distill-epochs auto: training images between two checks of the choose-split accuracy "
                  "(training stops after --check-patience checks without a gain or at the original's accuracy).")
@spec_option("--check-patience", field="distill.patience", type=int,
             help="With --distill-epochs auto: checks in a row without a gain before training stops (the best "
                  "weights are kept; an accuracy near 70% on 2,500 images has a standard error of 0.9 points).")
@click.option("--check-average/--no-check-average", "distill__average", default=None,
              help="With --distill-epochs auto and --finetune: fine-tune over --distill-images (none: 30,720) "
                   "without stopping early, average the weights at every check and keep the average closest to "
                   "the original (lowest choose-split KL). Replayed on nine CIFAR-10 DeiT-Small fine-tuning runs it "
                   "kept 0.42 points more on the report split than the best single check, but the one whole export "
                   "measured (11 blocks, 16.7 min) lost the same 1.52 points as the default.  "
                   "[default: no-check-average]")
@spec_option("--recover-images", field="distill.recover_images", type=int,
             help="After whole-model fine-tuning, training images of a brief fine-tuning after each MLP the budget "
                  "gives back, keeping the best of the start and two checks (0: none; CIFAR-10 DeiT-Small: two "
                  "moves at 5,000 images gained nothing and cost 3.5 min each).")
@spec_option("--plan-k", field="plan.k_choices",
             help="k values the plan may use, e.g. 25,50,100 (none: --k alone, so the plan decides only which blocks "
                  "to replace: up to rank 32 every option costs 3-7% of the MLP in onnxruntime, and the cheapest "
                  "double the error; bench/results/option-latency).")
@spec_option("--plan-rank", field="plan.rank_choices",
             help="Ranks the plan may use, e.g. 8,16,32 (none: --rank alone; shared basis only).")
@spec_option("--plan-units", field="plan.unit_choices",
             help="Exact hidden units per block the plan may use, e.g. 0,64,256 (none: --exact-units alone): each "
                  "count is calibrated on the same centres, and the budget's back-off adds units to blocks before it "
                  "gives one its MLP back where that buys more logit KL per multiply-add. Two-layer MLPs only.")
@spec_option("--opset", field="target.opset", type=int, help="ONNX opset.")
@spec_option("--max-memory", field="target.max_memory_mb", type=float,
             help="Memory budget in MiB for weights + peak live activations (estimated from the graph); the Taylor "
                  "blocks evaluate tokens in chunks until the T-MLP model fits.")
@spec_option("--memory-batch", field="target.memory_batch", type=int, help="Batch size --max-memory plans for.")
@spec_option("--device", field="target.device",
             help="Target board profile (tmlp devices list): caps the opset and IR version to what its onnxruntime "
                  "reads (decomposing newer ops) and records the profile in the manifest.")
@spec_option("--quantize", field="quantize.mode", type=click.Choice(["none", "static"]),
             help="'static': also write original.int8-static.onnx and tmlp.int8-static.onnx (onnxruntime QDQ: int8 "
                  "per-channel weights, uint8 activations calibrated on training images; the Taylor blocks stay "
                  "float). Under the accuracy budget the T-MLP int8 file must hold it against the float original: "
                  "the layers whose quantization moves the logits most stay float until it does. tmlp bench "
                  "measures them beside dynamic int8.")
@spec_option("--quant-calibration", field="quantize.calibration",
             type=click.Choice(["minmax", "entropy", "percentile"]),
             help="How --quantize static sets each activation's range from the calibration images.")
@spec_option("--quant-images", field="quantize.images", type=int,
             help="Training images --quantize static calibrates the activation ranges on.")
@spec_option("--token-keep", field="tokens.keep", type=click.FloatRange(0, 1, min_open=True),
             help="Token reduction of the T-MLP model (ViTs): after --token-layers keep this share of the patch "
                  "tokens the class token attends to most, plus one token fusing the rest (TopK + GatherElements "
                  "in ONNX). Applied before distillation and the budget check; original.onnx stays unreduced.")
@spec_option("--token-layers", field="tokens.layers",
             help="Block indices that reduce tokens, e.g. 3,6,9 (none: the 4th, 7th and 10th of 12, scaled to the "
                  "depth).")
@spec_option("--token-policy", field="tokens.policy", type=click.Choice(["attention", "learned"]),
             help="How --token-keep ranks tokens: 'attention' by the class token's attention (training-free); "
                  "'learned' adds a small score predictor per reducing block (DynamicViT-style), trained against the "
                  "original's logits on --token-policy-images training images.")
@spec_option("--token-policy-images", field="tokens.policy_images", type=click.IntRange(1),
             help="Training images the learned token policy trains on (one pass).")
@click.option("--out", "out_dir", default=None, help="Run folder [default: runs/<model>-<dataset>].")
@user_errors
def export(model: str, **flags) -> None:
    """Calibrate the T-MLP blocks and write original.onnx, tmlp.onnx, val.npz and manifest.json.

    Each replaced block becomes ArgMin over centre distances, Gather of the per-centre tensors and MatMul. Every
    export runs onnx.checker (full_check) and an onnxruntime vs PyTorch parity check on real inputs.

    Scale-out: `torchrun --standalone --nproc_per_node N -m tmlp export ...` splits calibration, distillation and
    fine-tuning over N processes (same model as one process); rank 0 writes (docs/distributed.md).
    """
    from tmlp.pipeline import run_export
    from tmlp.spec import ExportSpec, parse_int_list

    for key, flag in (("plan__k_choices", "--plan-k"), ("plan__rank_choices", "--plan-rank"),
                      ("plan__unit_choices", "--plan-units"), ("tokens__layers", "--token-layers")):
        flags[key] = parse_int_list(flags[key], flag, allow_zero=key in ("tokens__layers", "plan__unit_choices"))
    result = run_export(ExportSpec.from_flags(model, flags))
    if not result.files:  # under torchrun rank 0 reports
        return
    click.echo(f"done in {result.summary['export_seconds']:.0f} s: {result.out_dir}/ holds "
               f"{', '.join(sorted(os.path.basename(p) for p in result.files.values()))} and manifest.json; next: "
               f"tmlp bench --provider cpu --run {result.out_dir}")


# ---------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider: cpu, cuda or tensorrt; one this onnxruntime lacks is an error naming the "
                   "ones it has.")
@click.option("--allow-fallback", is_flag=True,
              help="Run on the CPU when --provider is not available; the table's header then says so.")
@click.option("--run", "run_dir", default=None, help="Run folder written by `tmlp export` [default: the newest "
              "under runs/].")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True, help="Timed runs per model.")
@click.option("--batch", type=click.IntRange(1, 65536), default=1, show_default=True, help="Images per timed run.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Fresh processes per variant (interleaved); latency is their median.")
@click.option("--compare", is_flag=True,
              help="Instead of measuring: print the device reports REPORTS (runtime/run.py --report) side by side.")
@click.option("--pareto", is_flag=True,
              help="Build every compressor and composition (int8 dynamic/static, T-MLP, token reduction, pruned and "
                   "low-rank MLPs, Tucker convolutions for CNNs) into RUN/pareto/ and measure them interleaved: "
                   "pareto.json, pareto.md and pareto.png (accuracy vs latency, the front drawn) in the run folder.")
@click.option("--token-keep", type=click.FloatRange(0, 1, min_open=True), default=0.7, show_default=True,
              help="--pareto: share of patch tokens the token-reduction variants keep.")
@click.option("--finetune-images", type=click.IntRange(0), default=5000, show_default=True,
              help="--pareto: training images of the distillation fine-tune of the pruned/low-rank/Tucker variants.")
@click.option("--mlp-keep", type=click.FloatRange(0, 1, min_open=True), multiple=True,
              help="--pareto: share of MLP multiply-adds the pruned and low-rank variants keep; repeat it for "
                   "several (e.g. --mlp-keep 0.1 --mlp-keep 0.25: their own accuracy-latency curve) [default: the "
                   "T-MLP's own share].")
@click.argument("reports", nargs=-1, type=click.Path(dir_okay=False))
@user_errors
def bench(provider, allow_fallback, run_dir, threads, warmup, runs, batch, repeats, compare, pareto, token_keep,
          finetune_images, mlp_keep, reports) -> None:
    """Original vs T-MLP vs onnxruntime int8 (and T-MLP + int8): accuracy, latency p50/p90, peak RSS, file size.

    Each model is measured in a fresh subprocess by runtime/run.py (the same code that runs on a device); results
    go to bench.json and bench.md in the run folder. `tmlp bench --compare a.json b.json` prints device reports side
    by side instead.
    """
    from tmlp.measure import compare_reports, find_run, load_report, run_bench

    if reports and not compare:
        raise TmlpError(f"unexpected argument {reports[0]!r}; to compare device reports use --compare a.json b.json")
    if compare:
        if not reports:
            raise TmlpError("--compare needs report files: tmlp bench --compare a.json b.json")
        click.echo(compare_reports([load_report(p) for p in reports]))
        return

    run_dir = run_dir or find_run("runs")
    if pareto:
        from tmlp.pareto import ParetoOptions, run_pareto

        result = run_pareto(run_dir, provider=provider, threads=threads, warmup=warmup, runs=runs, batch=batch,
                            repeats=repeats, fallback=allow_fallback,
                            options=ParetoOptions(token_keep, finetune_images, mlp_keep), log=click.echo)
        click.echo(result["markdown"])
        click.echo(f"wrote {os.path.join(run_dir, 'pareto.json')}, pareto.md and pareto.png")
        return
    result = run_bench(run_dir, provider=provider, threads=threads, warmup=warmup, runs=runs, batch=batch,
                       repeats=repeats, fallback=allow_fallback)
    click.echo(result["markdown"])
    click.echo(f"wrote {os.path.join(run_dir, 'bench.json')} and {os.path.join(run_dir, 'bench.md')}")


# ---------------------------------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Data sets: download them for training and calibration."""


@data.command()
@click.option("--dataset", required=True, type=click.Choice(["cifar10", "cifar100", "digits"]))
@click.option("--dir", "root", default=None, help="Target folder [default: $TMLP_DATA or ~/.cache/tmlp/data].")
@click.option("--url", default=None, help="Download from this mirror of the archive instead of the official address.")
@click.option("--md5", default=None, help="MD5 of the mirror's archive (the official archive's MD5 is built in).")
@user_errors
def download(dataset, root, url, md5) -> None:
    """Download a data set (torchvision's CIFAR archives, checked by MD5) into --dir."""
    from tmlp.download import download_dataset

    path = download_dataset(dataset, root, url=url, md5=md5)
    click.echo(f"{dataset} ready in {path}")


# ---------------------------------------------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """The model registry."""


@models.command("list")
def models_list() -> None:
    """Registered short names and what they build."""
    from tmlp.models import MODELS

    for name in sorted(MODELS):
        entry = MODELS[name]
        click.echo(f"{name:12s} {entry.description}")
    click.echo("Any timm model name (timm.list_models()) works too; `tmlp models show NAME` lists the blocks T-MLP "
              "replaces.")


@models.command("fp16-copy")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@user_errors
def models_fp16_copy(src, dst) -> None:
    """Write an fp16 copy of checkpoint SRC to DST (for committing a model; `tmlp export --checkpoint DST` reads it
    back as fp32). Works on a checkpoint of a run still training (its best.pt). SRC may also be a run's last.pt: DST
    then carries the run's schedule position and log too, and `tmlp train --init DST` with the same options
    continues that run on another machine (with a fresh optimizer state)."""
    from tmlp.io import check_file_target

    check_file_target(dst, "DST")
    if os.path.basename(src) == "last.pt":
        from tmlp.train import write_run_snapshot

        run_dir = os.path.dirname(src) or "."
        state = write_run_snapshot(run_dir, dst)
        click.echo(f"run snapshot: {dst} ({describe_files(dst)}) at epoch {state['epoch'] + 1}, "
                   f"batch {state['batch']}")
        if not os.path.isfile(os.path.join(run_dir, "train_log.jsonl")):
            click.echo(f"warning: no train_log.jsonl beside {src}, so the snapshot carries no log; make it from the "
                       "run folder's own last.pt, not a copy", err=True)
        return
    write_fp16_copy(src, dst)


@models.command("show")
@click.argument("name")
@click.option("--checkpoint", default=None, help="Show the blocks of this checkpoint's model instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the config and the block table as JSON.")
@user_errors
def models_show(name, checkpoint, as_json) -> None:
    """The config of model NAME and its MLP blocks: each block's type, input shape, rows per image, d_in -> d_out and
    share of the model's multiply-adds (one image at the model's input size), and why a block is skipped."""
    import torch

    from tmlp.blocks import block_table
    from tmlp.models import create_model, input_size, load_checkpoint, resolve_config
    from tmlp.surgery import candidate_blocks, skipped_blocks

    if checkpoint:
        net, payload = load_checkpoint(checkpoint)
        name, config = payload["model"], payload["config"]
    else:
        config = resolve_config(name)
        net = create_model(name, config).eval()
    fqns, skipped = candidate_blocks(net), skipped_blocks(net)
    blocks = [f for f in fqns if f not in skipped]
    size = input_size(name, config)
    infos, total = block_table(net, torch.zeros(1, *size), fqns)
    if as_json:
        click.echo(json.dumps({"model": name, "config": config, "input_size": list(size), "model_macs": total,
                               "replaceable_blocks": blocks, "blocks": [i.to_dict() for i in infos]}, indent=2))
        return
    share = sum(i.share for i in infos if i.skipped is None)
    click.echo(f"{name}: {len(blocks)} replaceable MLP blocks of {len(infos)}, {100 * share:.1f}% of the model's "
               f"{total / 1e6:.1f} M multiply-adds per {size[1]}x{size[2]} image")
    click.echo(f"{'block':34s} {'type':16s} {'input (C: channels)':22s} {'rows':>6s} {'d_in->d_out':>12s} "
               f"{'M MACs':>8s} {'share':>6s}")
    for i in infos:
        dims = [str(d) for d in i.input_shape]
        dims[i.channel_dim] = "C" + dims[i.channel_dim]
        click.echo(f"{i.fqn:34s} {i.kind:16s} {'x'.join(dims):22s} {i.rows:6d} {f'{i.d_in}->{i.d_out}':>12s} "
                   f"{i.macs / 1e6:8.2f} {100 * i.share:5.1f}%" + (f"  skipped: {i.skipped}" if i.skipped else ""))


# ---------------------------------------------------------------------------------------------------------------------
@main.group()
def devices() -> None:
    """Target boards: profiles (devices/*.toml) and checks under emulation."""


@devices.command("list")
def devices_list() -> None:
    """The known device profiles."""
    from tmlp.devices import load_profile, profile_names

    for name in profile_names():
        p = load_profile(name)
        click.echo(f"{name:18s} {p.description}; {p.arch}, {p.cores} cores, {p.memory_mb} MiB; onnxruntime "
                   f"{p.onnxruntime}, opset <= {p.max_opset}, IR <= {p.max_ir_version}")


@devices.command("show")
@click.argument("name")
@user_errors
def devices_show(name) -> None:
    """Every field of device profile NAME (or of a .toml path)."""
    from tmlp.devices import load_profile

    click.echo(json.dumps(load_profile(name).to_dict(), indent=2))


@devices.command("check")
@click.argument("name")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", default=None, help="Raw images (.npz x/y) to feed [default: val.npz beside the model, else "
                                           "random inputs].")
@click.option("--n", "n_inputs", type=click.IntRange(1, 4096), default=16, show_default=True, help="Inputs to compare.")
@user_errors
def devices_check(name, model, data, n_inputs) -> None:
    """Run MODEL with runtime/run.py on an emulated board NAME (qemu-user, the profile's CPU) and compare its outputs
    with this host's on the same inputs. The emulated arm64 Python is built once into the cache (~20 s, ~240 MB,
    from the Debian and PyPI registries). Exit status 1 when the outputs disagree."""
    from tmlp.devcheck import check_device
    from tmlp.devices import load_profile

    if data is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(model)), "val.npz")
        data = beside if os.path.isfile(beside) else None
    result = check_device(load_profile(name), model, data, n_inputs, log=click.echo)
    click.echo(result.report())
    if not result.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
