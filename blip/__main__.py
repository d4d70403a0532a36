"""``python -m blip`` (also ``torchrun --nproc_per_node N -m blip train CONFIG.yaml``)."""

import sys

from blip.cli import main

sys.exit(main())
