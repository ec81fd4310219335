"""argparse with this project's one-line refusals: `error: <what>; <prog> --help lists the options`, exit status 2.

argparse's own refusal prints the whole usage text before its one line of error; the entry scripts
(evaluate_rm.py, prepare_helpsteer2.py, btrm.plan_cli) use OneLineParser instead. Standard library only.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2  # argparse's own exit status for a refused command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message}; {self.prog} --help lists the options", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
