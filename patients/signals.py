"""Signals the records core sends, so that other apps react without the core importing them."""
from django.dispatch import Signal

# Sent inside the upload's transaction with ``images`` = the newly stored LesionImage objects.
# Receivers use transaction.on_commit / delay_on_commit, so a rolled-back upload queues nothing.
images_stored = Signal()

# Sent inside the transaction when a patient's records changed in a way that affects the
# patient-level context of their images (demographics, a lesion's site, an image deleted).
patient_records_changed = Signal()
