import sys

from longctx_compiler.cli import main

sys.exit(main())
