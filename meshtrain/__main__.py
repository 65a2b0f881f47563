from meshtrain.cli import main
import sys
sys.exit(main())
