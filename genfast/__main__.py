import sys

from genfast.cli import main

sys.exit(main())
