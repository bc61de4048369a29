"""Remove stored image files that no database row refers to (left by a crash or an outer rollback)."""
import datetime

from django.core.management.base import BaseCommand

from patients import services


class Command(BaseCommand):
    help = ("Delete media files (images, thumbnails, heatmaps) no row refers to, in the local folder or the "
            "bucket (only files older than --hours).")

    def add_arguments(self, parser):
        parser.add_argument("--hours", type=float, default=1.0, help="minimum age of a file to delete")
        parser.add_argument("--dry-run", action="store_true", help="list the files, delete nothing")

    def handle(self, *args, hours, dry_run, **options):
        older_than = datetime.timedelta(hours=hours)
        if dry_run:
            for name in services.orphan_media_files(older_than=older_than):
                self.stdout.write(name)
            return
        n = services.purge_orphan_media_files(older_than=older_than)
        self.stdout.write(f"deleted {n} orphaned file(s)")
