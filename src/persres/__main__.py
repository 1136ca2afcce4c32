import sys

from persres.cli import main

sys.exit(main())
