import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .cli import main  # noqa: E402

sys.exit(main())
