"""Signals the records core sends, so that other apps react without the core importing them."""
from django.dispatch import Signal

# Sent inside the upload's transaction with ``images`` = the newly stored LesionImage objects.
# Receivers record the work in the same transaction (the inference outbox) and send messages only
# after commit, so a rolled-back upload queues nothing and a broker that is down loses nothing.
images_stored = Signal()

# Sent inside the transaction when a patient's records changed in a way that affects the
# patient-level context of their images (demographics, a lesion's site, an image deleted).
patient_records_changed = Signal()
