from django.contrib import admin, messages

from . import services
from .models import Analysis, ModelVersion


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "architecture", "input_size", "roc_auc_display", "threshold", "validated",
                    "is_active", "installed_at"]
    list_filter = ["is_active", "validated", "architecture"]
    search_fields = ["name", "sha256"]
    readonly_fields = ["name", "architecture", "input_size", "sha256", "weights_path", "card", "metrics",
                       "threshold", "validated", "context_model", "runtime_display", "is_active", "installed_at"]
    exclude = ["runtime"]  # shown read-only, as a table, by runtime_display
    actions = ["activate"]

    @admin.display(description="ROC-AUC (95% CI)")
    def roc_auc_display(self, obj):
        auc = obj.roc_auc
        if not isinstance(auc, (int, float)):
            return "–"
        ci = obj.roc_auc_ci
        return f"{auc:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")

    @admin.display(description="Inference runtime (measured by the worker)")
    def runtime_display(self, obj):
        from django.template.loader import render_to_string
        from django.utils.safestring import mark_safe

        # The template escapes every value; the result is the page fragment the model card shows.
        return mark_safe(render_to_string("inference/_runtime.html",
                                          {"runtime": services.runtime_summary(model_version=obj)}))

    def has_add_permission(self, request):
        return False  # versions come from `manage.py install_model`, which validates the checkpoint

    @admin.action(description="Activate (and queue analyses of images without a result for it)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version to activate.", messages.ERROR)
            return
        version = queryset.get()
        n = services.activate_model_version(model_version=version)
        self.message_user(request, f"{version.name} is now active; {n} analyses queued.", messages.SUCCESS)


@admin.register(Analysis)
class AnalysisAdmin(admin.ModelAdmin):
    list_display = ["id", "image", "model_version", "status", "probability", "final_score", "attempts",
                    "worker", "queued_at", "finished_at"]
    list_filter = ["status", "model_version"]
    list_select_related = ["model_version", "image__lesion__patient"]
    search_fields = ["image__lesion__patient__mrn", "error"]
    date_hierarchy = "queued_at"

    def get_queryset(self, request):
        return super().get_queryset(request).defer("embedding")

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields if f.name not in ("embedding", "claim_token")]

    def get_fields(self, request, obj=None):
        return self.get_readonly_fields(request, obj)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
