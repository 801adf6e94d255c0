import sys

from batchmon.cli.main import main

sys.exit(main())
