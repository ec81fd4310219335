"""python -m bench.gpu_check: see bench/gpu_check/__init__.py."""

import sys

from bench.gpu_check.run import main

report = main()
sys.exit(143 if report and report.get("interrupted") else 0)  # 128 + SIGTERM: stopped partway
