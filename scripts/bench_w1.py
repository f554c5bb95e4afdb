"""The W1 benchmark as a script (same as `specoffload bench`), for machines without the
package installed: `PYTHONPATH=<dir holding a specoffload link to the repo> python scripts/bench_w1.py ...`."""

import sys

from specoffload.bench import main

if __name__ == "__main__":
    sys.exit(main())
