"""Model versions and the analyses they produce. No torch here: the web process imports this."""
import logging
import uuid

import numpy as np
from django.db import models, transaction
from django.db.models import Q

from patients.models import LesionImage


class ModelVersion(models.Model):
    name = models.CharField(max_length=100, unique=True)
    architecture = models.CharField(max_length=50, help_text="Backbone, e.g. se_resnet50.")
    input_size = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the checkpoint file.")
    weights_path = models.CharField(max_length=500, help_text="Checkpoint file under MODEL_ROOT.")
    card = models.JSONField(default=dict, help_text="The model card as exported by training.")
    metrics = models.JSONField(default=dict, help_text="Validation metrics from the card.")
    threshold = models.FloatField(default=0.5, help_text="Operating threshold from the card.")
    validated = models.BooleanField(
        default=False, help_text="Validated for clinical use. Unvalidated output is labelled so."
    )
    context_model = models.JSONField(
        null=True, blank=True, help_text="Patient-context model exported with this version, if any."
    )
    runtime = models.JSONField(
        default=dict, blank=True,
        help_text="Inference runtime the worker chose for this version on its machine, by measurement: the "
                  "candidates tried, their speed and their deviation from the fp32 reference probabilities.")
    is_active = models.BooleanField(default=False)
    installed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-installed_at"]
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_model")
        ]

    def __str__(self):
        return self.name

    @property
    def roc_auc(self):
        value = (self.metrics or {}).get("roc_auc")
        if isinstance(value, dict):
            value = next((value[k] for k in ("value", "estimate", "mean", "point") if k in value), None)
        return value

    @property
    def context_model_summary(self) -> dict | None:
        """What a reader of a context score needs to know about the context model: what it was
        trained on (simulated or real patients, the assumed within-patient resemblance), its
        metrics and threshold. None when the version has no context model."""
        cm = self.context_model or None
        if not cm:
            return None
        td = cm.get("training_data") or {}
        from training.context_features import FEATURE_VERSION

        return {
            "kind": cm.get("kind"),
            "feature_version": cm.get("feature_version"),
            "usable": cm.get("feature_version") == FEATURE_VERSION,
            "feature_names": cm.get("feature_names") or [],
            "constraints": cm.get("constraints") or {},
            "scale": cm.get("scale"),
            # One threshold: the version's (context-adjusted scores are on the image scale).
            "threshold": self.threshold,
            "metrics": cm.get("metrics") or {},
            "training_data": {k: td[k] for k in ("kind", "description", "resemblance", "n_rows", "n_patients")
                              if k in td},
            "validated": False,
        }

    @property
    def per_source_metrics(self) -> list[tuple[str, dict]]:
        """[(source, metrics)] from the card's held-out evaluation, pooled first; [] for cards
        without a per-source breakdown (older single-network versions)."""
        m = self.metrics or {}
        per = m.get("per_source") or {}
        if not isinstance(per, dict) or not per:
            return []
        return [("pooled", m)] + sorted((k, v) for k, v in per.items() if isinstance(v, dict))

    @property
    def members(self) -> list[dict]:
        """The member networks of an ensemble version (the card's ``members``); [] for one network."""
        members = (self.card or {}).get("members") or []
        return [x for x in members if isinstance(x, dict)]

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def roc_auc_ci(self) -> tuple[float, float] | None:
        """The 95% interval of the ROC-AUC when the card has one (several spellings accepted)."""
        m = self.metrics or {}
        candidates = [m.get("roc_auc_ci"), m.get("roc_auc_ci95")]
        if isinstance(m.get("roc_auc"), dict):
            d = m["roc_auc"]
            candidates += [d.get("ci"), d.get("ci95"), (d.get("low", d.get("ci_low")), d.get("high", d.get("ci_high")))]
        candidates.append((m.get("roc_auc_low", m.get("roc_auc_ci_low")), m.get("roc_auc_high", m.get("roc_auc_ci_high"))))
        for c in candidates:
            if isinstance(c, dict):
                c = (c.get("low"), c.get("high"))
            if isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, (int, float)) for v in c):
                return float(c[0]), float(c[1])
        return None


def _heatmap_path(instance, filename):
    return f"heatmaps/{uuid.uuid4().hex}.png"


class Analysis(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    image = models.ForeignKey(LesionImage, on_delete=models.CASCADE, related_name="analyses")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="analyses")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    probability = models.FloatField(null=True, blank=True, help_text="Image-only melanoma probability.")
    member_probabilities = models.JSONField(
        null=True, blank=True,
        help_text="Each member network's own probability, by member name (ensemble versions).")
    embedding = models.BinaryField(null=True, blank=True, editable=False, help_text="float32 image embedding.")
    # Patient context (filled by the re-scoring pass over all of the patient's images).
    context_features = models.JSONField(null=True, blank=True)
    final_score = models.FloatField(
        null=True, blank=True,
        help_text="The final calibrated melanoma probability (same scale as the image probability): "
                  "context-adjusted when the version has a context model, else the image probability. "
                  "Empty while the context score is pending.")
    final_score_source = models.CharField(max_length=20, blank=True, help_text="'context' or 'image'.")
    context_explanation = models.JSONField(
        null=True, blank=True, help_text="What the patient context changed and why (direction, main reason).")
    previous_final_score = models.FloatField(
        null=True, blank=True, help_text="The final score before the last change not caused by this image.")
    score_changed_at = models.DateTimeField(null=True, blank=True)
    score_change_reason = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    # Set by the conditional UPDATE that claims the row; results are written only under the claim.
    claim_token = models.CharField(max_length=32, blank=True, editable=False)
    attempts = models.PositiveSmallIntegerField(default=0)
    timings = models.JSONField(default=dict, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    queued_at = models.DateTimeField(auto_now_add=True)
    # Last time a task message was sent for this row (the sweeper re-sends when it is old).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    context_updated_at = models.DateTimeField(null=True, blank=True)
    # Explanation heatmap (Grad-CAM), computed by the worker after the score: a private derived
    # image, served only through the access-checked heatmap view.
    heatmap = models.FileField(upload_to=_heatmap_path, max_length=255, blank=True, editable=False)
    heatmap_info = models.JSONField(default=dict, blank=True,
                                    help_text="How the heatmap was made (method, input size), or why it failed.")

    class Meta:
        ordering = ["-queued_at"]
        verbose_name_plural = "analyses"
        indexes = [models.Index(fields=["model_version", "status"], name="analysis_version_status")]
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="one_analysis_per_image_and_version")
        ]

    def __str__(self):
        return f"{self.model_version} on image {self.image_id}: {self.status}"

    @property
    def embedding_dim(self) -> int | None:
        # Lists annotate ``embedding_size`` (bytes) and defer the embedding: no query per row.
        if "embedding_size" in self.__dict__:
            return None if self.embedding_size is None else self.embedding_size // 4
        return None if self.embedding is None else len(self.embedding) // 4

    @property
    def display_score(self) -> float | None:
        """THE score shown and compared with the version's threshold: the final score when there is
        one, else (context pending) the image probability -- both on the same calibrated scale."""
        return self.final_score if self.final_score is not None else self.probability

    @property
    def score_source(self) -> str | None:
        """'context' or 'image': what produced ``display_score``."""
        if self.display_score is None:
            return None
        return self.final_score_source if self.final_score is not None and self.final_score_source else "image"

    @property
    def context_pending(self) -> bool:
        """Done, but the patient-context score is not in yet (the version has a context model)."""
        return self.status == self.Status.DONE and self.probability is not None and self.final_score is None

    def get_embedding(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        return np.frombuffer(bytes(self.embedding), dtype=np.float32)

    def set_embedding(self, vector) -> None:
        self.embedding = np.asarray(vector, dtype=np.float32).tobytes()


def _remove_heatmap_file(sender, instance, **kwargs):
    """A deleted analysis (cascade from its image) takes its heatmap file once the deletion commits."""
    name = instance.heatmap.name if instance.heatmap else ""
    if not name:
        return
    storage = instance.heatmap.storage

    def remove():
        try:
            storage.delete(name)
        except OSError:
            logging.getLogger(__name__).exception("could not remove %s", name)

    transaction.on_commit(remove)


models.signals.post_delete.connect(_remove_heatmap_file, sender=Analysis,
                                   dispatch_uid="inference.remove_heatmap_file")


class PendingRescore(models.Model):
    """Outbox row: this patient's context must be recomputed for this model version.

    Written in the same transaction as the change that made the context stale (a lesion's site, a
    deleted image, a new result, a replaced context model). It stays until a re-scoring pass that
    started after the request has committed (``inference.context.rescore_patient`` deletes it when
    the ``token`` it read is still the row's), so a lost message, a broker that was down or a worker
    that died is recovered by the sweeper, which re-sends rows not sent recently.
    """

    patient = models.ForeignKey("patients.Patient", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="+")
    # A new request replaces the token: a pass that read the old one leaves the row for another pass.
    token = models.CharField(max_length=32)
    requested_at = models.DateTimeField()
    # Last time a task message was sent for it (NULL: never; the sweeper sends those first).
    sent_at = models.DateTimeField(null=True, blank=True)
    sends = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["patient", "model_version"], name="one_pending_rescore")]
        indexes = [models.Index(fields=["sent_at"], name="pending_rescore_sent")]

    def __str__(self):
        return f"re-score patient {self.patient_id} for version {self.model_version_id}"


class WorkerLease(models.Model):
    """A running worker process (its main process): claims are stamped with ``name``.

    The worker writes a heartbeat every few seconds; a worker that starts (and the sweeper) hands
    back the claims of workers that no longer exist: same host and the process is gone, or no
    heartbeat for WORKER_LEASE_SECONDS (another host).
    """

    name = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self):
        return self.name
