"""Which test tier runs (docs/development.md): the quick tier by default, the whole suite with `RUN_SLOW=1`."""

import os

RUN_SLOW = os.environ.get("RUN_SLOW", "").strip().lower() in ("1", "true", "yes", "on")
