"""Change stamps (patients/stamps.py) for what the inference app adds to the clinical pages: an
analysis changes its patient's stamp; a model version (name, threshold, validation, activation...)
changes the global stamp, since every page names the version and its metrics."""
from django.db import migrations

TRIGGERS = [
    ("analysis", "inference_analysis",
     "(SELECT l.patient_id FROM patients_lesionimage i INNER JOIN patients_lesion l ON l.id = i.lesion_id"
     " WHERE i.id = {row}.image_id)"),
    ("modelversion", "inference_modelversion", None),
]


def install(apps, schema_editor):
    from patients.stamps import install_triggers

    for name, table, patient_sql in TRIGGERS:
        install_triggers(schema_editor, name, table, patient_sql)


def remove(apps, schema_editor):
    from patients.stamps import remove_triggers

    for name, table, _ in TRIGGERS:
        remove_triggers(schema_editor, name, table)


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0007_outbox_and_worker_leases"),
        ("patients", "0003_data_change_stamps"),
    ]

    operations = [migrations.RunPython(install, remove)]
