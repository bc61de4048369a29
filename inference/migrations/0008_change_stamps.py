"""Change stamps (patients/stamps.py) for what the inference app adds to the clinical pages: an
analysis changes its patient's stamp; a model version (name, threshold, validation, activation...)
changes the global stamp, since every page names the version and its metrics."""
from django.db import migrations

from patients.stamps import trigger_migration

TRIGGERS = [
    ("analysis", "inference_analysis",
     "(SELECT l.patient_id FROM patients_lesionimage i INNER JOIN patients_lesion l ON l.id = i.lesion_id"
     " WHERE i.id = {row}.image_id)"),
    ("modelversion", "inference_modelversion", None),
]


class Migration(migrations.Migration):

    dependencies = [
        ("inference", "0007_outbox_and_worker_leases"),
        ("patients", "0003_data_change_stamps"),
    ]

    operations = [trigger_migration(TRIGGERS)]
