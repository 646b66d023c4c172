import sys

from icep.interrupts import Interrupted, stop_on_signals

# Signals stop icep with one line from the first moment: importing torch and the rest takes a while.
try:
    with stop_on_signals():
        from icep.app import main
except Interrupted as exc:
    print(f"icep: {exc}", file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)
main()
