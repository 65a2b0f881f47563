import sys

from meshtrain.worker.runtime import main

sys.exit(main())
