from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("inference", "0005_one_scale_context")]

    operations = [
        migrations.AddField(
            model_name="modelversion",
            name="runtime",
            field=models.JSONField(
                blank=True, default=dict,
                help_text="Inference runtime the worker chose for this version on its machine, by measurement: "
                          "the candidates tried, their speed and their deviation from the fp32 reference "
                          "probabilities."),
        ),
    ]
