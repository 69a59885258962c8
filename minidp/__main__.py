import sys

from minidp.cli import main

sys.exit(main())
