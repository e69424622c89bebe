import sys

from pipelines.demo.reduction.program import main

sys.exit(main())
