"""Model versions and the analyses they produce. No torch here: the web process imports this."""
import numpy as np
from django.db import models
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
        return self.metrics.get("roc_auc")


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
    embedding = models.BinaryField(null=True, blank=True, editable=False, help_text="float32 image embedding.")
    # Patient context (filled by the re-scoring pass over all of the patient's images).
    context_features = models.JSONField(null=True, blank=True)
    final_score = models.FloatField(
        null=True, blank=True, help_text="Context-adjusted score; the image probability without a context model."
    )
    final_score_source = models.CharField(max_length=20, blank=True, help_text="'context' or 'image'.")
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    timings = models.JSONField(default=dict, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    context_updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-queued_at"]
        verbose_name_plural = "analyses"
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="one_analysis_per_image_and_version")
        ]

    def __str__(self):
        return f"{self.model_version} on image {self.image_id}: {self.status}"

    def get_embedding(self) -> np.ndarray | None:
        if self.embedding is None:
            return None
        return np.frombuffer(bytes(self.embedding), dtype=np.float32)

    def set_embedding(self, vector) -> None:
        self.embedding = np.asarray(vector, dtype=np.float32).tobytes()
