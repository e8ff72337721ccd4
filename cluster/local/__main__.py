import sys

from cluster.local.head import main

sys.exit(main())
