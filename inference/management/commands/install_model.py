"""python manage.py install_model CHECKPOINT [--name N] [--activate] [--card card.json] [--context-model cm.json]"""
from django.core.management.base import BaseCommand, CommandError

from inference import services


class Command(BaseCommand):
    help = ("Validate a checkpoint (load it, run it on a generated test image), copy it under MODEL_ROOT by "
            "its SHA-256 and record it as a model version. Accepts this project's checkpoints and the plain "
            "state_dicts of the original notebook (model.* + out.*) and Flask demo (base_model.* + l0.*).")

    def add_arguments(self, parser):
        parser.add_argument("checkpoint")
        parser.add_argument("--name", help="Version name (default: from the card, else architecture-sha).")
        parser.add_argument("--activate", action="store_true", help="Make it the active version and queue "
                            "analyses of every image without a result for it.")
        parser.add_argument("--activate-if-new", action="store_true",
                            help="Activate it only when this call installs it or no version is active "
                                 "(run.sh: a version an admin chose later is not switched back).")
        parser.add_argument("--card", help="Model card JSON (overrides/extends the card in the checkpoint).")
        parser.add_argument("--context-model", help="Patient-context model JSON (default: context_model.json "
                            "beside the checkpoint, if present).")
        parser.add_argument("--skip-if-installed", action="store_true",
                            help="If this exact file is already installed, report it (and --activate it) "
                                 "instead of refusing; a changed context model beside it replaces the "
                                 "installed one and re-scores that version's patients.")
        parser.add_argument("--probe-size", type=int, help="Input size of the validation run (default: the "
                            "card's input size).")

    def handle(self, *args, **opts):
        if opts["activate_if_new"] and not opts["activate"]:
            from inference.models import ModelVersion
            from training.hashing import file_sha256

            try:
                installed = ModelVersion.objects.filter(sha256=file_sha256(opts["checkpoint"])).exists()
            except OSError:
                installed = False  # install_model_version reports the missing file
            opts["activate"] = not installed or not ModelVersion.objects.filter(is_active=True).exists()
        try:
            version = services.install_model_version(
                checkpoint_path=opts["checkpoint"], name=opts["name"], activate=opts["activate"],
                card_path=opts["card"], context_model_path=opts["context_model"], probe_size=opts["probe_size"],
                skip_if_installed=opts["skip_if_installed"],
            )
        except services.ModelInstallError as exc:
            raise CommandError(str(exc)) from exc
        report = getattr(version, "validation_report", None)
        if report is None:
            self.stdout.write(f"already installed: {version.name} (sha256 {version.sha256[:12]}…)"
                              + (" [active]" if version.is_active else "")
                              + ("; its context model was replaced by the new one beside the checkpoint "
                                 "and its patients are being re-scored"
                                 if getattr(version, "context_model_replaced", False) else ""))
            return
        auc = version.roc_auc
        self.stdout.write(self.style.SUCCESS(
            f"installed {version.name}: {version.architecture}, {version.input_size} px, sha256 {version.sha256[:12]}…, "
            f"ROC-AUC {auc if auc is not None else 'unknown'}, threshold {version.threshold}, "
            f"{'validated' if version.validated else 'NOT validated for clinical use'}, "
            f"context model {'yes' if version.context_model else 'no'}"
            + (", active" if version.is_active else "")))
        self.stdout.write(f"validation run: {report}")
