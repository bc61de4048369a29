"""The training loop: cached data, AdamW + warm-up/cosine, class imbalance, bf16 autocast,
channels_last, early stopping on validation AUC, best checkpoint per fold, resumable, DDP."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from . import metrics as M
from .datasets import Record
from .folds import assign_folds, load_folds, save_folds
from .network import MelanomaNet, save_checkpoint
from .preprocessing import load_rgb, to_batch, describe as describe_preprocessing


@dataclass
class TrainConfig:
    backbone: str = "se_resnet50"
    pretrained_weights: str | None = None  # path, "imagenet" (hub cache) or None (random init)
    input_size: int = 96
    folds: int = 3
    only_folds: list[int] | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    patience: int = 4
    dropout: float = 0.2
    imbalance: str = "pos_weight"  # "pos_weight" | "sampler" | "none"
    amp: str = "auto"  # "auto" | "bf16" | "fp16" | "none"
    aug_strength: float = 1.0
    num_workers: int = 0
    threads: int = 0  # 0 = leave torch's default
    seed: int = 42
    tta: bool = True
    eval_batch_size: int = 64
    time_budget_s: float = 0.0  # 0 = no budget; else stop epochs that would not fit
    max_steps_per_epoch: int = 0  # 0 = full epoch (tests use small values)
    select: str = "best"  # "best": the epoch with the best validation AUC; "last": the last epoch
    # knowledge distillation: a .npy of teacher logits, one per record (e.g. an ImageNet-initialised
    # member's out-of-fold logits); loss = (1 - alpha) * BCE(labels) + alpha * T^2 * BCE(soft targets)
    teacher_logits: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    data: str = ""
    layout: str = "auto"
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers

def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main():
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def amp_dtype(amp: str, device: torch.device):
    """The autocast dtype to use, or None for fp32."""
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16":
        raise ValueError("fp16 autocast is only offered on CUDA; use bf16 or none on CPU")
    supported = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if amp == "bf16" or supported:
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at
    ``total`` steps (the schedule spans all planned steps; early stopping does not compress it)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_cache(records: list[Record], size: int, cache_dir: str | None = None) -> np.ndarray:
    """Decode every image once at ``size`` (JPEG draft mode) into one uint8 (N, size, size, 3)
    array, stored as .npy in ``cache_dir`` keyed by the file list so reruns reuse it."""
    key = hashlib.sha1("\n".join(f"{r.image_id}|{r.path}" for r in records).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"cache_{size}px_{key}.npy") if cache_dir else None
    if path and os.path.exists(path):
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (len(records), size, size, 3):
            log(f"using cached images {path}")
            return np.ascontiguousarray(arr)
    from tqdm import tqdm

    arr = np.empty((len(records), size, size, 3), dtype=np.uint8)
    t0 = time.time()
    for i, r in enumerate(tqdm(records, desc=f"decode {size}px", disable=not is_main(),
                               mininterval=2 if sys.stderr.isatty() else 30)):
        try:
            arr[i] = load_rgb(r.path, size)
        except Exception as exc:
            raise ValueError(f"cannot decode image {r.image_id} at {r.path}: {exc}") from exc
    log(f"decoded {len(records)} images at {size}px in {time.time() - t0:.1f}s")
    if path and is_main():
        os.makedirs(cache_dir, exist_ok=True)
        np.save(path + ".tmp.npy", arr)
        os.replace(path + ".tmp.npy", path)
    return arr


class CachedImages(Dataset):
    def __init__(self, arrays: np.ndarray, indices: np.ndarray, targets: np.ndarray, transform=None,
                 teacher: np.ndarray | None = None):
        self.arrays, self.indices, self.targets, self.transform = arrays, indices, targets, transform
        self.teacher = teacher

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        img = self.arrays[j]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        if self.teacher is not None:
            return img, float(self.targets[j]), float(self.teacher[j])
        return img, float(self.targets[j])


class Collate:
    """Batch of (uint8 image, target[, teacher logit]) -> normalised tensor, targets[, teacher]."""

    def __init__(self, normalisation: str = "imagenet"):
        self.normalisation = normalisation

    def __call__(self, batch):
        cols = list(zip(*batch))
        out = [to_batch(list(cols[0]), self.normalisation), torch.tensor(cols[1], dtype=torch.float32)]
        if len(cols) > 2:
            out.append(torch.tensor(cols[2], dtype=torch.float32))
        return tuple(out)



@torch.no_grad()
def predict(model: nn.Module, arrays, batch_size: int = 64, tta: bool = False, amp=None,
            device=torch.device("cpu"), progress: bool = False):
    """Logits (N,) and embeddings (N, embedding_dim) as float32 numpy. With ``tta`` they are the
    mean over identity, horizontal flip, vertical flip and both flips."""
    from tqdm import tqdm
    from .network import normalisation

    model.eval()
    n = len(arrays)
    norm = normalisation(model.backbone_name)
    logits = np.empty(n, dtype=np.float32)
    embs = np.empty((n, model.embedding_dim), dtype=np.float32)
    for s in tqdm(range(0, n, batch_size), disable=not progress, desc="predict",
                  mininterval=2 if sys.stderr.isatty() else 30):
        x = to_batch(arrays[s:s + batch_size], norm).to(device)
        with autocast(device, amp):
            lo, em = model.forward_tta(x, tta=tta)
        logits[s:s + batch_size] = lo.float().cpu().numpy()
        embs[s:s + batch_size] = em.float().cpu().numpy()
    return logits, embs


def read_teacher_logits(path: str, image_ids: list[str] | None, n: int) -> np.ndarray:
    """Teacher logits, one per record: a ``.npy`` in record order, or a CSV with ``image_id`` and
    ``logit`` columns (what ``python -m training evaluate --predictions`` writes), matched by id.
    Records without a teacher logit get NaN (allowed only outside the training images)."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    import csv

    with open(path, newline="") as f:
        by_id = {row["image_id"]: float(row["logit"]) for row in csv.DictReader(f)}
    if image_ids is None:
        raise ValueError("a CSV of teacher logits needs the records' image ids")
    return np.array([by_id.get(i, np.nan) for i in image_ids], dtype=np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# --------------------------------------------------------------------------- distributed

def setup_distributed():
    """Initialise DDP when launched by torchrun (LOCAL_RANK set and WORLD_SIZE > 1)."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist, device


# --------------------------------------------------------------------------- per fold

def _card_base(cfg: TrainConfig) -> dict:
    from .augment import describe as describe_aug
    from .network import normalisation

    return {
        "architecture": cfg.backbone,
        "input_size": cfg.input_size,
        "preprocessing": describe_preprocessing(cfg.input_size, normalisation(cfg.backbone)),
        "augmentation": describe_aug(cfg.input_size, cfg.aug_strength),
        "pretrained_weights": cfg.pretrained_weights or "none (random initialisation)",
    }


def train_fold(cfg: TrainConfig, fold: int, arrays: np.ndarray, targets: np.ndarray,
               fold_of: np.ndarray, run_dir: str, dist=None, device=torch.device("cpu"),
               deadline: float | None = None) -> dict:
    from tqdm import tqdm
    from .augment import train_transform

    fdir = os.path.join(run_dir, f"fold{fold}")
    os.makedirs(fdir, exist_ok=True)
    done_path = os.path.join(fdir, "done.json")
    if os.path.exists(done_path):
        log(f"fold {fold}: already done, skipping")
        with open(done_path) as f:
            return json.load(f)

    world = dist.get_world_size() if dist else 1
    rank = dist.get_rank() if dist else 0
    torch.manual_seed(cfg.seed + fold)
    tr_idx = np.nonzero(fold_of != fold)[0]
    va_idx = np.nonzero(fold_of == fold)[0]
    n_pos = int(targets[tr_idx].sum())
    n_neg = len(tr_idx) - n_pos
    log(f"fold {fold}: train {len(tr_idx)} ({n_pos} melanoma), val {len(va_idx)} "
        f"({int(targets[va_idx].sum())} melanoma)")

    from .network import normalisation

    teacher = None
    if cfg.teacher_logits:
        teacher = read_teacher_logits(cfg.teacher_logits, cfg.extra.get("image_ids"), len(targets))
        if teacher.shape != (len(targets),) or not np.isfinite(teacher[tr_idx]).all():
            raise ValueError(f"{cfg.teacher_logits}: expected {len(targets)} finite teacher logits "
                             f"(one per record), got shape {teacher.shape}")
        log(f"fold {fold}: distilling from {cfg.teacher_logits} (alpha {cfg.distill_alpha}, "
            f"T {cfg.distill_temperature})")
    ds = CachedImages(arrays, tr_idx, targets, train_transform(cfg.input_size, cfg.aug_strength),
                      teacher=teacher)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    sampler = None
    if dist:
        if cfg.imbalance == "sampler":
            raise ValueError("--imbalance sampler is not supported with DDP; use pos_weight")
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, shuffle=True, seed=cfg.seed + fold, drop_last=True)
    elif cfg.imbalance == "sampler":
        w = np.where(targets[tr_idx] == 1, n_neg / max(n_pos, 1), 1.0)
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double),
                                                         len(tr_idx), replacement=True, generator=gen)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(tr_idx) // world > cfg.batch_size,
                        collate_fn=Collate(normalisation(cfg.backbone)),
                        num_workers=cfg.num_workers, generator=gen,
                        persistent_workers=cfg.num_workers > 0)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    model = MelanomaNet(cfg.backbone, cfg.pretrained_weights, dropout=cfg.dropout)
    model = model.to(device, memory_format=torch.channels_last)
    # the ImageNet classifier of the pretrainedmodels net is never used (we use .features());
    # freezing it keeps it out of the optimizer and lets DDP see every trainable parameter used
    for p in getattr(model.backbone, "last_linear", nn.Identity()).parameters():
        p.requires_grad_(False)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    # total steps of the schedule; shrinks (only) when --time-budget cannot fit all planned epochs,
    # so the cosine still reaches its floor by the last epoch that will actually run
    sched_total = [total_steps]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, sched_total[0], cfg.min_lr_ratio))
    pos_weight = None
    if cfg.imbalance == "pos_weight":
        pos_weight = torch.tensor(n_neg / max(n_pos, 1), dtype=torch.float32, device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    adt = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda") if adt == torch.float16 else None

    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0, "step": 0,
             "planned_epochs": cfg.epochs}
    last_path = os.path.join(fdir, "last.pt")
    if os.path.exists(last_path):
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        state.setdefault("planned_epochs", cfg.epochs)
        sched_total[0] = state["planned_epochs"] * steps_per_epoch
        torch.set_rng_state(ck["torch_rng"])
        gen.set_state(ck["loader_rng"])
        log(f"fold {fold}: resumed from {last_path} at epoch {state['epoch']}")

    net = model
    if dist:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    best_path = os.path.join(fdir, "best.pt")
    va_arrays = arrays[va_idx]
    va_y = targets[va_idx]
    last_epoch_s = None
    stopped = "epochs"
    while state["epoch"] < state["planned_epochs"]:
        epoch = state["epoch"]
        t0 = time.time()
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        net.train()
        tot_loss, seen = 0.0, 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"fold {fold} epoch {epoch}",
                   disable=not is_main(), mininterval=2 if sys.stderr.isatty() else 60)
        for i, batch in enumerate(bar):
            if i >= steps_per_epoch:
                break
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with autocast(device, adt):
                out = net(x)
            loss = loss_fn(out.float(), y)
            if teacher is not None:
                T, a = cfg.distill_temperature, cfg.distill_alpha
                soft = torch.sigmoid(batch[2].to(device) / T)
                kd = nn.functional.binary_cross_entropy_with_logits(out.float() / T, soft) * T * T
                loss = (1 - a) * loss + a * kd
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            state["step"] += 1
            tot_loss += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{tot_loss / seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        bar.close()
        train_s = time.time() - t0

        # validation on rank 0, decision broadcast to the others
        decision = [None]
        if rank == 0:
            lo, _ = predict(model, va_arrays, cfg.eval_batch_size, tta=False, amp=adt, device=device)
            val_loss = float(nn.functional.binary_cross_entropy_with_logits(
                torch.from_numpy(lo), torch.from_numpy(va_y.astype(np.float32))))
            auc = M.roc_auc(va_y, lo)
            pauc = M.partial_auc_above_tpr(va_y, lo)
            improved = auc > state["best_auc"] or cfg.select == "last"
            rec = {"fold": fold, "epoch": epoch, "step": state["step"],
                   "train_loss": tot_loss / max(seen, 1), "val_loss": val_loss, "val_auc": auc,
                   "val_pauc_80": pauc, "lr": sched.get_last_lr()[0], "train_seconds": train_s,
                   "train_images_per_s": seen * world / train_s, "seconds": time.time() - t0,
                   "improved": improved}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"fold {fold} epoch {epoch}: loss {rec['train_loss']:.4f} val_loss {val_loss:.4f} "
                f"val_auc {auc:.4f} pauc {pauc:.4f} ({rec['train_images_per_s']:.1f} img/s, "
                f"{rec['seconds']:.0f}s)")
            decision = [(auc, improved)]
        if dist:
            dist.broadcast_object_list(decision, src=0)
        auc, improved = decision[0]
        state["epoch"] = epoch + 1
        if improved:
            state.update(best_auc=auc, best_epoch=epoch, bad_epochs=0)
            if rank == 0:
                card = dict(_card_base(cfg), fold=fold, epoch=epoch, val_auc=auc)
                save_checkpoint(best_path, model, card, fp16=False)
        else:
            state["bad_epochs"] += 1
        last_epoch_s = time.time() - t0
        if deadline:
            # re-plan: how many more epochs fit before the fold's deadline (keeping room for the
            # out-of-fold TTA scoring, ~4x one validation pass)? Decided on rank 0, shared.
            plan = [None]
            if rank == 0:
                reserve = 4 * (last_epoch_s - train_s) + 30
                fit = int((deadline - time.time() - reserve) // last_epoch_s)
                plan = [max(epoch + 1, min(state["planned_epochs"], epoch + 1 + fit))]
            if dist:
                dist.broadcast_object_list(plan, src=0)
            if plan[0] < state["planned_epochs"]:
                log(f"fold {fold}: time budget: planning {plan[0]} epochs instead of "
                    f"{state['planned_epochs']} (cosine schedule re-spanned to end with them)")
                state["planned_epochs"] = plan[0]
                sched_total[0] = plan[0] * steps_per_epoch
                stopped = "time_budget"
        if rank == 0:
            tmp = last_path + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "state": state,
                        "torch_rng": torch.get_rng_state(), "loader_rng": gen.get_state()}, tmp)
            os.replace(tmp, last_path)
        if state["bad_epochs"] >= cfg.patience:
            stopped = "early_stopping"
            log(f"fold {fold}: early stop after epoch {epoch} (best {state['best_epoch']})")
            break

    result = {"fold": fold, "best_epoch": state["best_epoch"], "best_val_auc": state["best_auc"],
              "epochs_run": state["epoch"], "epochs_planned": cfg.epochs,
              "epochs_scheduled": state["planned_epochs"], "stopped_by": stopped, "n_train": int(len(tr_idx)),
              "n_val": int(len(va_idx)), "n_val_melanoma": int(va_y.sum())}
    if rank == 0:
        # out-of-fold predictions of the best checkpoint (with flip TTA if configured)
        from .network import load_checkpoint

        best, _ = load_checkpoint(best_path)
        best = best.to(device, memory_format=torch.channels_last)
        t0 = time.time()
        lo, em = predict(best, va_arrays, cfg.eval_batch_size, tta=cfg.tta, amp=adt, device=device)
        np.savez(os.path.join(fdir, "oof.npz"), index=va_idx, logits=lo,
                 embeddings=em.astype(np.float16))
        result["oof_auc"] = M.roc_auc(va_y, lo)
        result["oof_seconds"] = time.time() - t0
        log(f"fold {fold}: best epoch {state['best_epoch']} val_auc {state['best_auc']:.4f}; "
            f"OOF (tta={cfg.tta}) auc {result['oof_auc']:.4f}")
        with open(done_path, "w") as f:
            json.dump(result, f, indent=1)
        if os.path.exists(last_path):
            os.remove(last_path)  # the fold is finished; best.pt is kept
    if dist:
        dist.barrier()
    return result


# --------------------------------------------------------------------------- whole run

def run_training(cfg: TrainConfig, records: list[Record], run_dir: str, cache_dir: str | None = None):
    """Train every fold (skipping finished ones, resuming an interrupted one) and return results."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist, device = setup_distributed()
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        keys = ("backbone", "input_size", "folds", "epochs", "batch_size", "lr", "seed", "data")
        diff = {k: (old.get(k), asdict(cfg)[k]) for k in keys if old.get(k) != asdict(cfg)[k]}
        if diff:
            raise ValueError(f"{run_dir} holds a run with a different config {diff}; "
                             f"use a new --out directory")
    elif is_main():
        with open(cfg_path, "w") as f:
            json.dump(asdict(cfg), f, indent=1)

    folds_path = os.path.join(run_dir, "folds.csv")
    if os.path.exists(folds_path):
        fold_of = load_folds(folds_path, records)
    else:
        fold_of = assign_folds(records, cfg.folds, cfg.seed)
        if is_main():
            save_folds(folds_path, records, fold_of)
    targets = np.array([r.target for r in records], dtype=np.int64)
    if cfg.teacher_logits:
        cfg.extra = dict(cfg.extra, image_ids=[r.image_id for r in records])
    arrays = build_cache(records, cfg.input_size, cache_dir or os.path.join(run_dir, "cache"))
    if dist:
        dist.barrier()
    todo = cfg.only_folds if cfg.only_folds is not None else list(range(cfg.folds))
    t_start = time.time()
    results = []
    for pos, k in enumerate(todo):
        deadline = None
        if cfg.time_budget_s:
            deadline = t_start + cfg.time_budget_s * (pos + 1) / len(todo)
        results.append(train_fold(cfg, k, arrays, targets, fold_of, run_dir, dist, device, deadline))
    if dist:
        dist.destroy_process_group()
    return results
