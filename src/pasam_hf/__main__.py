import sys

from pasam_hf.cli import main

sys.exit(main())
