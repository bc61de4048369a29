from django.dispatch import receiver

from patients.signals import images_stored


@receiver(images_stored, dispatch_uid="inference.queue_analyses_for_new_images")
def queue_analyses_for_new_images(sender, images, **kwargs):
    from . import services

    services.queue_analyses(images=images)
