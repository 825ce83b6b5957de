"""`python -m lite_rlhf ...`: the `lite-rlhf` command, also as torchrun launches it
(`torchrun --nproc-per-node=N -m lite_rlhf run CONFIG`)."""

import sys

from lite_rlhf.cli import main

sys.exit(main())
