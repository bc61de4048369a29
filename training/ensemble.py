"""Ensemble model versions: several member networks and a combiner learnt on held-out predictions.

A *bundle* is what a model version runs. It is read from either file format:

* ``melanoma-records/ensemble-1`` -- members (each a ``MelanomaNet`` state_dict with its own card:
  architecture, input size, preprocessing, flip TTA), a logistic combiner over the members' logits
  ``p = sigmoid(bias + sum_i w_i * logit_i)`` fitted on held-out predictions (so ``p`` is a
  calibrated probability), the member whose embedding is stored for patient context, and the card;
* ``melanoma-records/1`` or a legacy state_dict (``training.network.load_checkpoint``) -- one member
  and the identity combiner (``w = [1]``, ``bias = 0``): the probability is ``sigmoid(logit)``,
  exactly what a single checkpoint always meant.

``Bundle.predict_arrays`` is THE scoring path: the inference worker, ``python -m training evaluate``
and the validation run of ``install_model`` all call it. ``Bundle.decode`` decodes an image once
per member input size with ``training.preprocessing.load_rgb``, as training cached it.

Nothing here imports Django.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .network import CHECKPOINT_FORMAT, MelanomaNet, load_checkpoint, normalisation
from .preprocessing import load_rgb, normalisation_of, to_batch

ENSEMBLE_FORMAT = "melanoma-records/ensemble-1"


@dataclass
class Member:
    name: str
    model: MelanomaNet
    card: dict

    @property
    def input_size(self) -> int:
        return int(self.card.get("input_size") or 224)

    @property
    def normalisation(self) -> str:
        if isinstance(self.card.get("preprocessing"), dict) and "normalisation" in self.card["preprocessing"]:
            return normalisation_of(self.card)
        return normalisation(self.model.backbone_name)

    @property
    def tta(self) -> bool:
        return bool(self.card.get("tta", False))

    @property
    def architecture(self) -> str:
        return self.model.backbone_name


@dataclass
class Output:
    probabilities: np.ndarray  # (N,) float64: the bundle's calibrated probability
    logits: np.ndarray  # (N,) float64: the combiner's logit
    member_logits: np.ndarray  # (N, M) float32
    embeddings: np.ndarray  # (N, D) float32 of the embedding member

    def member_probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.member_logits.astype(np.float64)))


@dataclass
class Bundle:
    members: list[Member]
    weights: np.ndarray  # (M,) combiner weights on member logits
    bias: float
    embedding_member: int
    card: dict
    # member index -> training.runtime.MemberRuntime (the runtime measured fastest within tolerance
    # on this machine); a member without one runs eagerly in fp32 (channels_last).
    runtimes: dict = field(default_factory=dict)
    runtime_decision: dict = field(default_factory=dict)  # what training.runtime measured and chose

    # ----------------------------------------------------------------- description
    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def architecture(self) -> str:
        if not self.is_ensemble:
            return self.members[0].architecture
        return "ensemble: " + " + ".join(m.architecture for m in self.members)

    @property
    def input_sizes(self) -> list[int]:
        return sorted({m.input_size for m in self.members})

    @property
    def embedding_dim(self) -> int:
        return self.members[self.embedding_member].model.embedding_dim

    # ----------------------------------------------------------------- scoring
    def decode(self, source) -> dict[int, np.ndarray]:
        """Decode one image (path or binary file) once per member input size."""
        out = {}
        for size in self.input_sizes:
            if hasattr(source, "seek"):
                source.seek(0)
            out[size] = load_rgb(source, size)
        return out

    def stack(self, decoded: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
        return {s: np.stack([d[s] for d in decoded]) for s in self.input_sizes}

    def combine(self, member_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self.bias + np.asarray(member_logits, dtype=np.float64) @ self.weights.astype(np.float64)
        return z, 1.0 / (1.0 + np.exp(-z))

    @property
    def precision(self) -> str:
        """The runtime each member runs with ("eager-fp32" until one was chosen), "+"-joined when
        the members differ."""
        kinds = [self.runtimes[i].name if i in self.runtimes else "eager-fp32" for i in range(len(self.members))]
        return kinds[0] if len(set(kinds)) == 1 else "+".join(kinds)

    def normalise(self, member: Member, arrays: np.ndarray) -> torch.Tensor:
        return to_batch(arrays, member.normalisation)

    @torch.inference_mode()
    def member_forward(self, i: int, arrays: np.ndarray, amp=None):
        """One member on a batch of uint8 arrays at its input size: (logits, embeddings) float32,
        through its chosen runtime (flips of the TTA in one batch), or eagerly with ``amp`` autocast
        when given (the reference path)."""
        from .runtime import tta_forward

        m = self.members[i]
        x = to_batch(arrays, m.normalisation)
        if amp is None and i in self.runtimes:
            return tta_forward(self.runtimes[i].forward, x, m.tta)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            lo, em = m.model.forward_tta(x, tta=m.tta)
        return lo.float().numpy(), em.float().numpy()

    def predict_arrays(self, arrays_by_size: dict[int, np.ndarray], batch_size: int = 64,
                       progress: bool = False) -> Output:
        """Score uint8 arrays (one stack per member input size, same images in the same order)."""
        n = len(next(iter(arrays_by_size.values())))
        mlog = np.empty((n, len(self.members)), dtype=np.float32)
        emb = np.empty((n, self.embedding_dim), dtype=np.float32)
        from tqdm import tqdm

        for i, m in enumerate(self.members):
            arr = arrays_by_size[m.input_size]
            if len(arr) != n:
                raise ValueError(f"{len(arr)} images at {m.input_size}px but {n} at another size")
            for s in tqdm(range(0, n, batch_size), disable=not progress, desc=f"member {m.name}",
                          mininterval=30):
                lo, em = self.member_forward(i, arr[s:s + batch_size])
                mlog[s:s + batch_size, i] = lo
                if i == self.embedding_member:
                    emb[s:s + batch_size] = em
        z, p = self.combine(mlog)
        return Output(probabilities=p, logits=z, member_logits=mlog, embeddings=emb)

    def predict_files(self, sources, batch_size: int = 64) -> Output:
        return self.predict_arrays(self.stack([self.decode(s) for s in sources]), batch_size)

    def to_channels_last(self) -> "Bundle":
        for m in self.members:
            m.model = m.model.float().eval().to(memory_format=torch.channels_last)
        return self


# --------------------------------------------------------------------------- files

def save_ensemble(path, members: list[Member], *, weights, bias: float, embedding_member: int,
                  card: dict, fp16: bool = True) -> None:
    """Write an ensemble bundle (members' floating tensors as fp16 by default)."""
    if len(weights) != len(members):
        raise ValueError(f"{len(weights)} combiner weights for {len(members)} members")
    payload_members = []
    for m in members:
        state = {}
        for k, v in m.model.state_dict().items():
            v = v.detach().cpu()
            state[k] = (v.half() if fp16 and v.is_floating_point() else v).contiguous()
        payload_members.append({"name": m.name, "backbone": m.model.backbone_name,
                                "input_size": m.input_size, "state_dict": state, "card": m.card})
    payload = {"format": ENSEMBLE_FORMAT, "members": payload_members,
               "combiner": {"kind": "logistic", "weights": [float(w) for w in weights],
                            "bias": float(bias)},
               "embedding_member": int(embedding_member), "card": card}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _to_fp32(state: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}


def load_bundle(path, map_location="cpu") -> Bundle:
    """Read an ensemble bundle or a single checkpoint (our format or a legacy state_dict)."""
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- say clearly what the file is
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(raw, dict) and raw.get("format") == ENSEMBLE_FORMAT:
        missing = [k for k in ("members", "combiner", "card") if k not in raw]
        if missing:
            raise ValueError(f"{path}: {ENSEMBLE_FORMAT} bundle lacks {missing}")
        members = []
        for j, pm in enumerate(raw["members"]):
            for k in ("name", "backbone", "state_dict", "card"):
                if k not in pm:
                    raise ValueError(f"{path}: member {j} lacks {k!r}")
            model = MelanomaNet(pm["backbone"])
            try:
                model.load_state_dict(_to_fp32(pm["state_dict"]))
            except RuntimeError as exc:
                raise ValueError(f"{path}: member {pm['name']!r} does not match "
                                 f"MelanomaNet({pm['backbone']}): {exc}") from exc
            card = dict(pm["card"])
            card.setdefault("input_size", int(pm.get("input_size", 224)))
            card.setdefault("architecture", pm["backbone"])
            members.append(Member(pm["name"], model.float().eval(), card))
        comb = raw["combiner"]
        if comb.get("kind") != "logistic":
            raise ValueError(f"{path}: unsupported combiner {comb.get('kind')!r}")
        w = np.asarray(comb.get("weights", []), dtype=np.float64)
        if w.shape != (len(members),) or not np.isfinite(w).all() or not np.isfinite(comb.get("bias", np.nan)):
            raise ValueError(f"{path}: combiner needs {len(members)} finite weights and a bias")
        emb = int(raw.get("embedding_member", 0))
        if not 0 <= emb < len(members):
            raise ValueError(f"{path}: embedding_member {emb} out of range")
        return Bundle(members, w, float(comb["bias"]), emb, dict(raw["card"]))
    if isinstance(raw, dict) and "format" in raw and raw["format"] not in (CHECKPOINT_FORMAT, ENSEMBLE_FORMAT):
        raise ValueError(f"{path}: unsupported checkpoint format {raw['format']!r} (this code reads "
                         f"{CHECKPOINT_FORMAT!r} and {ENSEMBLE_FORMAT!r})")
    del raw
    model, card = load_checkpoint(str(path), map_location=map_location)
    member = Member(card.get("architecture", model.backbone_name), model, card)
    return Bundle([member], np.ones(1), 0.0, 0, card)
