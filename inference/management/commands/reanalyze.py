"""python manage.py reanalyze [--batch-size N] [--missing-only]: re-queue every image for the active version."""
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from inference import services
from patients.models import LesionImage


class Command(BaseCommand):
    help = "Re-queue the analysis of every image for the active model version, in batches (progress bar)."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=200, help="Images per database batch.")
        parser.add_argument("--missing-only", action="store_true",
                            help="Only images without a finished result for the active version.")

    def handle(self, *args, **opts):
        version = services.active_model_version()
        if version is None:
            raise CommandError("No active model version: install one with `manage.py install_model CHECKPOINT "
                               "--activate` first.")
        size = max(1, opts["batch_size"])
        ids = list(LesionImage.objects.order_by("pk").values_list("pk", flat=True))
        queued = 0
        with tqdm(total=len(ids), unit="img", desc=f"queue for {version.name}", file=self.stderr._out) as bar:
            for start in range(0, len(ids), size):
                chunk = ids[start:start + size]
                queued += services.requeue_images(model_version=version, image_ids=chunk,
                                                  redo_done=not opts["missing_only"])
                bar.update(len(chunk))
        self.stdout.write(self.style.SUCCESS(f"{queued} analyses queued for {version.name} ({len(ids)} images)."))
