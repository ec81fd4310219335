"""One command for a lent GPU machine (docs/gpu.md, "On a GPU for the first time"), one module per part.

    bash bench/gpu_check.sh              # on the GPU box, from a copy of the repository with .whl/ and .raystub/
    bash bench/gpu_check.sh --dry        # anywhere: the same parts on CPU with tiny sizes (the tests run it)
    python -m bench.gpu_check --dry --results /tmp/gc --parts smoke throughput

First, without importing torch: package versions as installed on the path (transformers' and verl's folders show
whether the carried wheels shadow the box's own), the GPUs nvidia-smi lists, the wheel set-up, the git commit
(GPU_CHECK_COMMIT where the copy has no .git). btrm.plan (CPU only: fake tensors) starts in the background for the
models the parts need, so its minutes overlap the GPU parts. Then the parts, each in its own subprocess with a
time limit (a failure or a timeout is recorded, the next part runs), in sizes.PART_ORDER, within one deadline
counted from gpu_check.sh's start:
  smoke             (smoke.py) imports in a fresh interpreter, torchrun's options, the varlen_attn kernel probe
  throughput        (throughput.py) the smaller model: pairs/s, real tokens/s, MFU per mode, one line per mode
  memory            (memory.py) the trainer's step's peak memory against btrm.plan's prediction
  trainer           (trainer.py) bash run_bt_rm.sh for 2 steps: FSDP2, FSDP1, FSDP2 with CPU offload
  layouts           (layouts.py) packed and shared rewards against padded in bf16, fwd+bwd time per layout
  throughput_large  (throughput.py) the larger model, in whatever time is left
Every size that differs between the GPU run and --dry is in sizes.SIZES.

Results (report.py): the results folder (gpu_check.sh passes $OUT, the one folder the device tool brings back)
holds gpu_check.json, gpu_check.txt (the summary table) and gpu_check-logs.tar.gz, each rewritten atomically
after every part: a command killed at any moment leaves the parts done so far. Stdout ends with the summary
table; the JSON goes to its file only.
"""
