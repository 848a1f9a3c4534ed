import sys

from prune_plugin.cli import main

sys.exit(main())
