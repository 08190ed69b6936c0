import sys

from vdr.cli import main

sys.exit(main())
