from django.dispatch import receiver

from patients.signals import images_stored, patient_records_changed


@receiver(images_stored, dispatch_uid="inference.queue_analyses_for_new_images")
def queue_analyses_for_new_images(sender, images, **kwargs):
    from . import services

    services.queue_analyses(images=images)


@receiver(patient_records_changed, dispatch_uid="inference.rescore_after_records_change")
def rescore_after_records_change(sender, patient_id, **kwargs):
    """Context features depend on demographics, sites and the set of images: re-score after commit."""
    from . import services

    services.queue_rescore(patient_id=patient_id)
