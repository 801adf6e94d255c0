import sys

from batchmon.cli import main

sys.exit(main())
