"""``python -m focus_decoding.cli ...`` (and ``accelerate launch -m focus_decoding.cli ...``)."""
import sys

from . import main

sys.exit(main())
