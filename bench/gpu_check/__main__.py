"""python -m bench.gpu_check: see bench/gpu_check/__init__.py."""

from bench.gpu_check.run import main

main()
