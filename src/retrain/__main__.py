import sys

from retrain.cli import retrain_main

sys.exit(retrain_main())
