from django.db import migrations, models


def retire_old_context_scores(apps, schema_editor):
    """Context scores of feature version 1 were on another scale (ISIC 2020's prevalence, their own
    threshold): show the image probability until the version's patients are re-scored."""
    Analysis = apps.get_model("inference", "Analysis")
    ModelVersion = apps.get_model("inference", "ModelVersion")
    old = [v.pk for v in ModelVersion.objects.all()
           if not (isinstance(v.context_model, dict) and v.context_model.get("feature_version") == 2)]
    rows = Analysis.objects.filter(model_version_id__in=old, final_score_source="context")
    for a in rows.iterator():
        a.final_score = a.probability
        a.final_score_source = "image"
        a.save(update_fields=["final_score", "final_score_source"])


class Migration(migrations.Migration):
    dependencies = [("inference", "0004_analysis_heatmap")]

    operations = [
        migrations.AddField("analysis", "context_explanation", models.JSONField(
            blank=True, null=True,
            help_text="What the patient context changed and why (direction, main reason).")),
        migrations.AddField("analysis", "previous_final_score", models.FloatField(
            blank=True, null=True, help_text="The final score before the last change not caused by this image.")),
        migrations.AddField("analysis", "score_changed_at", models.DateTimeField(blank=True, null=True)),
        migrations.AddField("analysis", "score_change_reason", models.CharField(blank=True, max_length=200)),
        migrations.AlterField("analysis", "final_score", models.FloatField(
            blank=True, null=True,
            help_text="The final calibrated melanoma probability (same scale as the image probability): "
                      "context-adjusted when the version has a context model, else the image probability. "
                      "Empty while the context score is pending.")),
        migrations.RunPython(retire_old_context_scores, migrations.RunPython.noop),
    ]
