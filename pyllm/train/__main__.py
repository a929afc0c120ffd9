"""python -m pyllm.train (also under torchrun)."""

import sys

from . import main

sys.exit(main())
