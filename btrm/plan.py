"""Plan mode: does a config fit each GPU? One training step simulated on fake tensors, before launch.

    python -m btrm.plan_cli [--gpus N] [--gpu-memory GIB] [--margin FRACTION] [--tokens N] [--device cuda|cpu]
                            [--no-search] [--no-suggestions] [overrides...]   (run_bt_rm.sh --plan)

What it does (no GPU, no weights; Qwen3-32B on 8 GPUs plans in 9-15 s on 2 CPU cores, imports included):
1. composes the trainer's config (trainer.yaml + Hydra overrides, btrm.schema.compose_config) and checks it
   (check_config, with the world size); reads the model's config.json only (a local directory, or a hub id:
   transformers fetches config.json alone);
2. builds the model the trainer builds, with btrm.modeling's own steps: the `*ForTokenClassification` value head
   (num_labels=1) with master weights in model.fsdp_config.model_dtype, the attention layout, LoRA (with
   model.lora_base_dtype), gradient checkpointing, FSDP2 `fully_shard` per decoder layer (and embedding) and on
   the root (verl's apply_fsdp2) with model.mixed_precision resolved for the device, and the optimizer from
   optim.* (verl's build_optimizer); on the meta device, then on FakeTensorMode, in a fake process group of
   `gpus` ranks (rank 0 is planned: it holds the largest shards);
3. runs one micro-batch in the trainer's layout (packed / shared rows through btrm.attention's segment
   attention; padded rows; with ulysses_sequence_parallel_size N > 1, rank 0's share of the row split as the
   trainer splits it, btrm.sequence_parallel.compute_rewards in a fake group of N ranks: tokens/N through the
   decoder, attention over the whole row with heads/N and its all-to-all buffers; the budget and tokens/s are
   then per group row, shared by N GPUs) through forward and backward, then the optimizer step, each under torch's
   FSDPMemTracker, with the optimizer state already there (as in every step after the first); reports the
   per-rank peak of each phase split into parts: sharded / unsharded parameters, gradients, optimizer state and
   the step's temporaries, activations, temporaries, all-gather and reduce-scatter buffers;
4. finds the largest token budget that fits (`max_tokens_per_micro_batch`): a linear fit of the forward/backward
   peak from runs at `tokens` and 2 x `tokens` proposes it, a run there checks it, and chords between the
   largest fitting and the smallest failing run (the peak is convex in tokens) close in (SEARCH_RUNS runs at
   most); only budgets that were simulated and fit are reported;
5. estimates a micro-batch's FLOPs and the tokens/s they allow at an assumed MFU (MFU_ASSUMPTION, PEAK_TFLOPS);
6. when it does not fit (and suggest=True: the CLI's default), plans single changes that might (SUGGESTERS, cheapest
   to the user first: TIERS) with this same plan, at most MAX_SUGGESTION_PLANS of them, and lists those that fit
   (`suggestions`: each with its overrides, peak, largest budget and tokens/s; docs/fit-and-memory.md).

Depth: a model deeper than 3 layers is simulated with SIMULATED_LAYERS (2 and 3) decoder layers and scaled
linearly to its depth, moment by moment: every snapshot FSDPMemTracker takes of every FSDP module (the first and
the last decoder layer standing for the two ends of the stack) is extrapolated and the largest kept, since the
peak of a deep model can fall at another moment than a shallow one's (with gradient checkpointing, the start of
backward holds every layer's checkpoint, its end every layer's gradient).

The micro-batch: `tokens` tokens as an even number of equal conversations (chosen and rejected) of at most
data.max_length tokens. Default tokens: max(data.max_tokens_per_micro_batch, 2 x data.max_length) (a lone pair
longer than the budget runs alone); for a budget of `auto`, 2 x data.max_length; without a budget,
data.micro_batch_size_per_gpu (or 1) x 2 x data.max_length.

Fake CPU tensors stand for the GPU (a CPU-only torch cannot make fake CUDA tensors). For device cuda the plan
makes the choices the GPU would: bf16 compute (model.mixed_precision=auto), FlashAttention's varlen kernel for
packed rows (its registered fake kernel), AdamW's foreach implementation (torch's default for CUDA parameters: it
holds one fp32 temporary as large as the sharded parameters; optim.fused=true (the default) has
none), and adds the corrections named below (CUDA_CONTEXT_GIB, ALLOCATOR_FRAGMENTATION, PREFETCHED_LAYERS),
stated in the output. Not simulated: gradient clipping (in place, per-tensor norms), the start-up layout check
(no grad) and the full state dict rank 0 broadcasts while loading the checkpoint. With
model.fsdp_config.cpu_offload the sharded parameters, gradients and optimizer state count as host memory.
model.strategy=fsdp (FSDP1) is planned as FSDP2 (the same sharding; said in the notes). On CPU (device cpu, one
rank, fp32) bench/plan_accuracy.py measures the plan against a real step's resident memory (within 6%).

Defaults: --gpus is the number of visible CUDA GPUs, else 8 (the 8-GPU node trainer.yaml is sized for);
--gpu-memory is the visible GPU's memory, else 80 GiB (H100-80GB), said in the output; --margin is
trainer.gpu_memory_margin (the share of each GPU kept free);
--device follows trainer.device (cpu for cpu, else cuda). The last line printed is one JSON object (the dict
plan_config returns).

Python API (the same numbers as the CLI):
    plan_from_overrides(overrides, *, gpus=None, gpu_memory_gib=None, margin=None, tokens=None, device=None,
                        search=True, suggest=False)
    plan_config(config, *, gpus=None, gpu_memory_gib=None, margin=None, tokens=None, device=None, search=True,
                suggest=False)
    largest_fitting_budget(config, *, gpus=None, gpu_memory_gib=None, margin=None, device=None)
    auto_token_budget(config, world_size)  # data.max_tokens_per_micro_batch=auto in bt_trainer: a TokenBudget

Process state: planning creates a fake process group and destroys it, restores the RNG state and what it
patched, and leaves nothing else behind (btrm.attention's segment attention stays registered with transformers,
as the trainer registers it), so the caller may go on to real work. Called in a process whose process group is
already initialised (a rank of the trainer), it plans in a fresh subprocess (`python -m btrm.plan_cli
--config-yaml ...`, 10-20 s) and returns that plan. Nothing happens on import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from btrm import attention, batching, modeling, sequence_parallel
from btrm.config import OptimSection, RunConfig
from btrm.plan_assumptions import DEFAULT_GPU_MEMORY_GIB, DEFAULT_GPUS
from btrm.schema import REPO, PreflightError

GIB = 2**30

SIMULATED_LAYERS = (2, 3)  # at both, first and last decoder layers differ (at 1 they are one) and prefetch a layer
MAX_BUDGET_TOKENS = 2**20  # the budget search stops here (and says so)
MAX_SIMULATED_CONVERSATIONS = 32  # a larger micro-batch is simulated with longer conversations (simulated_lengths)
SEARCH_RUNS = 6  # forward/backward runs (each at every simulated depth) the budget search may spend

# Throughput assumption. 989 TFLOP/s: dense bf16 peak of H100 SXM and H200 (NVIDIA datasheets, no sparsity).
PEAK_TFLOPS = 989.0
MFU_ASSUMPTION = 0.35  # FSDP training of 30B-class models commonly reaches 30-45% MFU on H100

# GPU corrections: what a GPU adds to the tensors the fake run tracks. Estimates, not yet calibrated on a GPU.
# CUDA context (~0.5 GiB with lazy module loading), cuBLAS workspaces and NCCL communicator buffers live outside
# torch's caching allocator, and so outside any tensor count.
CUDA_CONTEXT_GIB = 1.0
# The caching allocator reserves more than the tensors it holds (blocks split and cached per size and stream);
# in steady FSDP training reserved exceeds the allocated peak by a few percent.
ALLOCATOR_FRAGMENTATION = 0.05
# On a GPU, FSDP2 all-gathers the next layer on its own stream while the current one computes, so one more
# decoder layer's unsharded parameters (compute dtype) are alive than in the fake run, where ops run in order.
PREFETCHED_LAYERS = 1

# FSDPMemTracker's categories (torch.distributed._tools.fsdp2_mem_tracker._FSDPRefType values) -> part names
TRACKER_PARTS = {
    "Sharded Param": "sharded_params",
    "Unsharded Param": "unsharded_params",
    "Buffer": "buffers",
    "Sharded Grad": "sharded_grads",
    "Unsharded Grad": "unsharded_grads",
    "Activation": "activations",
    "Temp": "temps",
    "All Gather": "all_gather_buffers",
    "Reduce Scatter": "reduce_scatter_buffers",
    "OptState": "optimizer_state",
    "Inputs": "inputs",
}
MODEL_STATE_PARTS = ("sharded_params", "buffers", "sharded_grads", "optimizer_state")
OFFLOADED_PARTS = ("sharded_params", "sharded_grads", "optimizer_state", "optimizer_step_temps")

Parts = dict[str, float]  # part name -> bytes (floats: extrapolated)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PlanSettings:
    gpus: int
    device: str  # cuda | cpu: the device planned for (the simulation itself runs on fake CPU tensors)
    gpu_memory_gib: float
    gpu_memory_assumed: bool  # no GPU visible and none given: DEFAULT_GPU_MEMORY_GIB
    margin: float

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gib * GIB * (1 - self.margin)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpu_memory_gib() -> float:
    """The first visible GPU's memory. Asked of nvidia-smi, so that this process starts no CUDA context (the
    launcher plans before it starts the ranks; a context would hold ~0.5 GiB of GPU 0 all run long); torch's
    device properties where nvidia-smi cannot answer."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", first]
        answer = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        return float(answer.stdout.strip().splitlines()[0]) / 1024  # MiB
    return torch.cuda.get_device_properties(0).total_memory / GIB


def resolve_settings(
    config, *, gpus: int | None, gpu_memory_gib: float | None, margin: float | None, device: str | None
) -> PlanSettings:
    """Defaults filled in (module docstring) and checked."""
    if margin is None:
        margin = float(config.trainer.gpu_memory_margin)
    if device is None:
        device = "cpu" if config.trainer.device == "cpu" else "cuda"
    if device not in ("cuda", "cpu"):
        raise PreflightError(f"--device {device}: expected cuda or cpu")
    gpus = gpus if gpus is not None else (visible_gpus() or DEFAULT_GPUS)
    if gpus < 1:
        raise PreflightError(f"--gpus {gpus}: expected at least 1")
    if not 0 <= margin < 1:
        raise PreflightError(f"--margin {margin}: expected a fraction in [0, 1)")
    assumed = gpu_memory_gib is None and not (device == "cuda" and visible_gpus())
    if gpu_memory_gib is None:
        gpu_memory_gib = visible_gpu_memory_gib() if device == "cuda" and visible_gpus() else DEFAULT_GPU_MEMORY_GIB
    if gpu_memory_gib <= 0:
        raise PreflightError(f"--gpu-memory {gpu_memory_gib}: expected a positive number of GiB")
    return PlanSettings(gpus, device, float(gpu_memory_gib), assumed, margin)


def sequence_parallel_size(config) -> int:
    """ulysses_sequence_parallel_size (1 where the config has none): the ranks that share one packed row."""
    return int(config.get(sequence_parallel.KEY, 1) or 1)


def default_tokens(config) -> int:
    """The micro-batch to plan: the largest the config allows (the budget, or a lone longest pair when that is
    longer); for a budget of `auto`, a lone longest pair (what any budget must hold; the search finds the budget)."""
    data = config.data
    lone_pair = 2 * int(data.max_length)
    budget = data.max_tokens_per_micro_batch
    if budget is None:
        return (data.micro_batch_size_per_gpu or 1) * lone_pair
    if budget == "auto":
        return lone_pair
    return max(int(budget), lone_pair)


def conversation_lengths(tokens: int, max_length: int) -> list[int]:
    """`tokens` as whole pairs of equal conversations of at most max_length tokens (chosen, then rejected)."""
    if tokens < 2:
        raise PreflightError(f"--tokens {tokens}: a micro-batch holds at least one pair (2 tokens)")
    pairs = math.ceil(tokens / (2 * max_length))
    count = 2 * pairs
    return [tokens // count + (1 if i < tokens % count else 0) for i in range(count)]


def simulated_lengths(tokens: int, max_length: int) -> list[int]:
    """The conversations simulated: conversation_lengths, but at most MAX_SIMULATED_CONVERSATIONS of them (longer
    ones then stand in; the same tokens keep the same memory, attention kernels' state being linear in tokens):
    the fake run's Python cost grows with the segments of a packed row."""
    longest = max(max_length, math.ceil(tokens / MAX_SIMULATED_CONVERSATIONS))
    return conversation_lengths(tokens, longest)


def optimizer_config(optim: OptimSection, device: str) -> OptimSection:
    """optim.* as the trainer passes it to verl's build_optimizer. For device cuda, torch.optim's Adam/AdamW with
    no implementation chosen get foreach=True: torch's own choice for CUDA parameters, which on fake CPU tensors
    would fall to the per-parameter loop (no temporary the size of all parameters)."""
    optim = modeling.optimizer_settings(optim)
    override = dict(optim.override_optimizer_config or {})
    chosen = "foreach" in override or "fused" in override
    if device == "cuda" and optim.optimizer_impl == "torch.optim" and "adam" in optim.optimizer.lower() and not chosen:
        return dataclasses.replace(optim, override_optimizer_config={**override, "foreach": True})
    return optim


def planned_attn_implementation(setting: str) -> str:
    """The padded layout's attention: model.attn_implementation as the trainer resolves it, except that
    flash_attention_2 (CUDA only) is simulated by sdpa, whose flash kernel keeps the same O(tokens) state."""
    name = modeling.resolve_attn_implementation(setting)
    return "sdpa" if name == "flash_attention_2" else name


def with_depth(hf_config, layers: int):
    """A copy of the transformers config with `layers` decoder layers (per-layer lists cut to match)."""
    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return config


# ----------------------------------------------------------------------------- the fake world


@contextlib.contextmanager
def gpu_attention_kernels(device: str):
    """For device cuda, packed rows take btrm.attention's varlen_attn branch (its registered fake kernel), as on a
    GPU: the branch is chosen by `query.is_cuda`, which fake CPU tensors cannot answer yes to."""
    if device != "cuda":
        yield
        return
    original = attention.runs_on_varlen_kernel
    attention.runs_on_varlen_kernel = lambda query: query.dtype in (torch.float16, torch.bfloat16)
    try:
        yield
    finally:
        attention.runs_on_varlen_kernel = original


@dataclass(frozen=True)
class FakeWorld:
    mesh: object  # DeviceMesh over the fake ranks
    fake_mode: object  # FakeTensorMode: where the model's tensors are made and every step runs
    sequence_parallel: object  # btrm.sequence_parallel.SequenceParallel of rank 0 (its group: fake ranks 0..N-1)


@contextlib.contextmanager
def fake_world(gpus: int, device: str, sequence_parallel_size: int = 1):
    """A fake process group of `gpus` ranks (this process is rank 0), its device mesh, rank 0's sequence-parallel
    group (ranks 0..N-1, as the trainer's (dp, sp) mesh makes it; FSDP keeps the 1-D mesh over all ranks) and a
    FakeTensorMode; the group destroyed on exit, the RNG state restored. Refuses to run beside a real process
    group."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised here: plan in a subprocess (plan_config does)")
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    try:
        # the mesh outside FakeTensorMode: inside it, init_device_mesh fails on a data-dependent .item()
        mesh = init_device_mesh("cpu", (gpus,), mesh_dim_names=("fsdp",))
        size = sequence_parallel_size
        group = dist.new_group(list(range(size))) if size > 1 else None
        sp = sequence_parallel.SequenceParallel(size, 0, group, 0, gpus // size)
        with torch.random.fork_rng(devices=[]), gpu_attention_kernels(device):
            # non-fake inputs allowed: the model's meta tensors are the inputs of its to_empty (Simulation)
            yield FakeWorld(mesh, FakeTensorMode(allow_non_fake_inputs=True), sp)
    finally:
        dist.destroy_process_group()


def tracker_parts(snapshot) -> Parts:
    """An FSDPMemTracker snapshot ({device: {category: bytes}}) as {part name: bytes}, devices summed."""
    parts: Parts = dict.fromkeys(TRACKER_PARTS.values(), 0.0)
    for device_snapshot in snapshot.values():
        for category, size in device_snapshot.items():
            name = TRACKER_PARTS.get(getattr(category, "value", category))
            if name is not None:
                parts[name] += size
    return parts


@dataclass(frozen=True)
class SimulationFacts:
    """What a Simulation's model is, without the model."""

    parameters: int
    trainable_parameters: int
    embedding_parameters: int
    layer_bytes: int
    layout: str
    lora_settings: object
    class_name: str
    layers: int


# Measurements of fake runs for the life of the process: a plan's suggestions, and a suggestion planned again
# from its plan_command, simulate the same model again. Keyed by all a Simulation is built from (simulation_key).
MEASURED: dict[tuple, object] = {}


def simulation_key(config, hf_config, gpus: int, device: str, layers: int) -> tuple:
    """Everything a Simulation and its runs depend on: the whole config (but trainer.gpu_memory_margin, which
    only sets the usable memory), the model's config, the fake world and the depth."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(config, resolve=False)
    container.get("trainer", {}).pop("gpu_memory_margin", None)
    return json.dumps(container, sort_keys=True, default=str), hf_config.to_json_string(), gpus, device, layers


class Simulation:
    """The trainer's model with `layers` decoder layers on fake tensors, sharded over the fake world, with its
    optimizer and optimizer state (as in every step after the first)."""

    def __init__(self, config, hf_config, world: FakeWorld, layers: int, device: str):
        from verl.utils.fsdp_utils import apply_fsdp2

        settings = RunConfig.from_config(config)
        model_config = settings.model
        # Built and sharded on the meta device, then made fake: module.to(...) cannot swap fake parameters
        # (peft moves its adapters so), and meta needs no weight initialisation.
        with torch.device("meta"):
            model = modeling.value_head_model_from_config(
                with_depth(hf_config, layers),
                attn_implementation=planned_attn_implementation(model_config.attn_implementation),
                torch_dtype=modeling.DTYPES[model_config.fsdp_config.model_dtype],
                trust_remote_code=model_config.trust_remote_code,
            )
            self.embedding_parameters = model.get_input_embeddings().weight.numel()
            self.layout = batching.layout_for(settings.use_remove_padding, settings.data.share_prompt)
            model, self.lora_settings, self.class_name = modeling.adapt_model(model, model_config, layout=self.layout)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        compute_dtype = modeling.resolve_param_dtype(model_config.mixed_precision, device)
        first_layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
        self.layer_bytes = sum(p.numel() for p in first_layer.parameters()) * compute_dtype.itemsize
        # offload is accounted by moving parts to host memory (Planner.on_gpu); the fake run keeps them in place
        fsdp_kwargs = {**modeling.fsdp2_kwargs(model_config, world.mesh, device), "offload_policy": None}
        apply_fsdp2(model, fsdp_kwargs, modeling.verl_fsdp_config(model_config.fsdp_config))
        self.model, self.fake_mode, self.layers = model, world.fake_mode, layers
        self.sequence_parallel = world.sequence_parallel
        model.train()  # as the trainer's training_step (gradient checkpointing only acts in training mode)
        with self.fake_mode:
            model.to_empty(device="cpu")
            self.optimizer = self.optimizer_with_state(settings.optim, device)

    def facts(self) -> SimulationFacts:
        return SimulationFacts(
            **{field.name: getattr(self, field.name) for field in dataclasses.fields(SimulationFacts)}
        )

    def optimizer_with_state(self, optim: OptimSection, device: str) -> torch.optim.Optimizer:
        """The trainer's optimizer (verl's build_optimizer on the trainable parameters), its state created by one
        step on zero gradients: the state every step after the first starts with."""
        from verl.workers.config.optimizer import build_optimizer

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, optimizer_config(optim, device))
        for parameter in trainable:
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        return optimizer

    def rewards(self, lengths: list[int]) -> torch.Tensor:
        """One reward per conversation, computed in the trainer's layout."""
        if self.layout != "padded":
            batch = batching.collate_packed([[0] * n for n in lengths])
            # with ulysses_sequence_parallel_size N > 1: the trainer's own split (btrm.sequence_parallel) of the
            # row over the group: this rank's tokens/N through the decoder, the all-to-all buffers in attention
            return sequence_parallel.compute_rewards(self.model, batch, self.sequence_parallel)
        longest = max(lengths)
        input_ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        position_ids = torch.arange(longest).expand(len(lengths), -1)
        # Rows of (near) equal length: transformers drops an all-ones mask and runs causal attention. Passing no
        # mask computes the same without the data-dependent check of the mask that fake tensors cannot answer.
        logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
        return logits[:, -1, 0]

    def forward_backward(self, lengths: list[int]) -> dict[str, Parts]:
        """Parts at the moments of one micro-batch's forward and backward (gradients freed first, as the trainer's
        step does): {"peak": the peak; "<module>: <state> #<call>": the tracker's snapshots of each FSDP module
        (before / after its hooks, its own peaks)}."""
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        self.optimizer.zero_grad(set_to_none=True)
        tracker = FSDPMemTracker(self.model, self.optimizer)
        with self.fake_mode, tracker:
            rewards = self.rewards(lengths)
            half = rewards.shape[0] // 2
            (-F.logsigmoid(rewards[:half] - rewards[half:]).mean()).backward()
        moments = {"peak": tracker_parts(tracker.get_tracker_snapshot("peak"))}
        for stats in tracker.memory_tracking.values():
            name = moment_name(stats.mod_fqn, self.layers)
            for state, snapshots in stats.snapshots.items():
                # the root's own peaks are the step's peak, whatever moment that is: not comparable across depths
                if name is None or name == "root" and state.value.startswith("Peak"):
                    continue
                for call, snapshot in enumerate(snapshots):
                    if snapshot:
                        moments[f"{name}: {state.value.lower()} #{call}"] = tracker_parts(snapshot)
        return moments

    def optimizer_step(self) -> tuple[Parts, Parts]:
        """(peak parts of the optimizer step, parts resident after it); call after forward_backward.
        The tracker counts all the step allocates as optimizer state: what it frees again is its temporaries."""
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(self.model, self.optimizer)
        with self.fake_mode, tracker:
            self.optimizer.step()
        peak = tracker_parts(tracker.get_tracker_snapshot("peak"))
        after = tracker_parts(tracker.get_tracker_snapshot("current"))
        peak["optimizer_step_temps"] = peak["optimizer_state"] - after["optimizer_state"]
        peak["optimizer_state"] = after["optimizer_state"]
        return peak, after


def moment_name(fqn: str, layers: int) -> str | None:
    """An FSDP module's name, comparable across depths: decoder layers 0 and layers - 1 are "first layer" and
    "last layer" (interior layers lie between them: None), the root "root", any other module its path."""
    if "." not in fqn:  # fqn starts with the root's class name
        return "root"
    path = fqn.split(".", 1)[1]
    layer = re.fullmatch(r"(?:.*\.)?layers\.(\d+)", path)
    if layer is None:
        return path
    index = int(layer.group(1))
    return "first layer" if index == 0 else "last layer" if index == layers - 1 else None


def extrapolate(measured: dict[int, float | Parts], layers: int):
    """Values (numbers or parts) measured at two depths, extrapolated linearly to `layers` (or the one measured)."""
    if layers in measured:
        return measured[layers]
    (low, a), (high, b) = sorted(measured.items())[:2]
    share = (layers - low) / (high - low)
    if isinstance(a, dict):
        return {key: max(0.0, a[key] + (b[key] - a[key]) * share) for key in a}
    return a + (b - a) * share


# ----------------------------------------------------------------------------- the planner


class Planner:
    """Simulations at SIMULATED_LAYERS depths and every measurement scaled to the real depth, GPU corrections added."""

    def __init__(self, config, hf_config, settings: PlanSettings, world: FakeWorld):
        self.config, self.settings, self.hf_config, self.world = config, settings, hf_config, world
        self.layers = int(hf_config.num_hidden_layers)
        depths = (self.layers,) if self.layers <= max(SIMULATED_LAYERS) else SIMULATED_LAYERS
        self.keys = {d: simulation_key(config, hf_config, settings.gpus, settings.device, d) for d in depths}
        self.built: dict[int, Simulation] = {}  # built when a measurement is not in MEASURED
        self.simulations = {d: self.measured(d, ("facts",), lambda d=d: self.simulation(d).facts()) for d in depths}
        self._optimizer_phase: tuple[Parts, Parts] | None = None

    def simulation(self, depth: int) -> Simulation:
        if depth not in self.built:
            self.built[depth] = Simulation(self.config, self.hf_config, self.world, depth, self.settings.device)
        return self.built[depth]

    def measured(self, depth: int, what: tuple, measure):
        """MEASURED's copy of `what` at `depth`, measured first where it is not there."""
        key = (self.keys[depth], *what)
        if key not in MEASURED:
            MEASURED[key] = measure()
        return copy.deepcopy(MEASURED[key])

    def scaled(self, attribute: str) -> float:
        return extrapolate({d: getattr(s, attribute) for d, s in self.simulations.items()}, self.layers)

    @property
    def first(self) -> SimulationFacts:
        return next(iter(self.simulations.values()))

    def forward_backward(self, tokens: int) -> Parts:
        """Parts at the forward/backward peak of a micro-batch of `tokens` tokens, at the real depth.

        Scaled moment by moment: the peak of a deeper model may fall at another moment (with gradient
        checkpointing, the start of backward holds every layer's checkpoint, its end every layer's gradient),
        so each snapshot of each FSDP module is scaled to the real depth (the first and the last decoder layer
        standing for the two ends of the stack) and the largest taken."""
        lengths = simulated_lengths(tokens, self.config.data.max_length)
        measured = {
            d: self.measured(
                d, ("forward_backward", *lengths), lambda d=d: self.simulation(d).forward_backward(lengths)
            )
            for d in self.simulations
        }
        if self.layers in measured:
            return measured[self.layers]["peak"]
        common = set.intersection(*(set(m) - {"peak"} for m in measured.values()))
        # A module's own peak is where its memory was highest; at two depths that may be two different moments
        # (two near-equal candidates, one winning at each depth). At one moment no part shrinks with depth (model
        # states and checkpoints grow, the rest stays): a moment where one does is not the same moment at both
        # depths, and scaling it part by part would be meaningless (with sequence parallelism, tens of GiB).
        low, high = (measured[d] for d in sorted(measured)[:2])
        consistent = {n for n in common if all(high[n][k] >= low[n][k] - 2**20 for k in low[n])}
        scaled = [extrapolate({d: m[name] for d, m in measured.items()}, self.layers) for name in sorted(consistent)]
        peak = max(scaled, key=lambda parts: sum(parts.values()))
        # The peak may fall between two snapshots (inside a hook): what it exceeds them by is kept, as temporaries.
        above = max(sum(m["peak"].values()) - max(sum(m[n].values()) for n in common) for m in measured.values())
        return {**peak, "temps": peak["temps"] + max(0.0, above)}

    def optimizer_step(self) -> tuple[Parts, Parts]:
        """(peak parts, resident parts after the step), measured once: they do not depend on the tokens."""
        if self._optimizer_phase is None:
            # a simulation built anew (its forward/backward remembered) has its gradients from optimizer_with_state
            steps = {
                d: self.measured(d, ("optimizer_step",), lambda d=d: self.simulation(d).optimizer_step())
                for d in self.simulations
            }
            self._optimizer_phase = (
                extrapolate({d: peak for d, (peak, _) in steps.items()}, self.layers),
                extrapolate({d: after for d, (_, after) in steps.items()}, self.layers),
            )
        return self._optimizer_phase

    def on_gpu(self, parts: Parts, phase: str) -> tuple[float, Parts, Parts]:
        """(peak bytes one GPU needs, the parts on the GPU, the corrections): offloaded parts go to the host."""
        offload = self.config.model.fsdp_config.cpu_offload
        gpu = {k: v for k, v in parts.items() if not (offload and k in OFFLOADED_PARTS)}
        tracked = sum(gpu.values())
        corrections: Parts = {}
        if self.settings.device == "cuda":
            if phase == "forward_backward":
                corrections["prefetched_layers"] = PREFETCHED_LAYERS * self.scaled("layer_bytes")
            corrections["allocator_fragmentation"] = ALLOCATOR_FRAGMENTATION * (tracked + sum(corrections.values()))
            corrections["cuda_context"] = CUDA_CONTEXT_GIB * GIB
        return tracked + sum(corrections.values()), gpu, corrections

    def forward_backward_peak(self, tokens: int) -> float:
        """Bytes one GPU needs at the forward/backward peak of a micro-batch of `tokens` tokens."""
        return self.on_gpu(self.forward_backward(tokens), "forward_backward")[0]

    def optimizer_peak(self) -> float:
        return self.on_gpu(self.optimizer_step()[0], "optimizer_step")[0]


def round_budget(tokens: float) -> int:
    """Budgets as people write them: a multiple of 256 from 2,048 tokens up."""
    tokens = int(tokens)
    return tokens // 256 * 256 if tokens >= 2048 else tokens


def search_budget(planner: Planner, tokens: int, fb_peak: float) -> tuple[int | None, str]:
    """The largest micro-batch (tokens) whose step fits the usable memory, and how it was found.

    The optimizer step's peak does not depend on tokens. The forward/backward peak grows with tokens, linearly
    or, with gradient checkpointing, as the larger of two lines (the end of backward, where the gradients are
    whole, and its start, where every layer's checkpoint is alive): convex. So: a linear fit from runs at
    `tokens` and 2 x `tokens` proposes a budget; a run there brackets the answer; then chords between the
    largest fitting and the smallest failing run (regula falsi: on a convex peak a chord's answer always fits)
    close in, at most SEARCH_RUNS runs in all."""
    usable = planner.settings.usable_bytes
    if planner.optimizer_peak() > usable:
        return None, "none: the optimizer step alone exceeds the usable memory"
    runs = {tokens: fb_peak, 2 * tokens: planner.forward_backward_peak(2 * tokens)}
    slope = (runs[2 * tokens] - fb_peak) / tokens
    candidate = tokens + (usable - fb_peak) / slope if slope > 0 else MAX_BUDGET_TOKENS
    # Illinois: a failing end kept twice counts half as far over, so the chords close in from both sides
    high_weight = 1.0
    while len(runs) < SEARCH_RUNS:
        candidate = max(2, min(round_budget(candidate), MAX_BUDGET_TOKENS))
        if candidate in runs:
            break
        runs[candidate] = planner.forward_backward_peak(candidate)
        low = max((t for t, peak in runs.items() if peak <= usable), default=None)
        high = min((t for t, peak in runs.items() if peak > usable), default=None)
        if high is None:  # every run fits: the proposal (or the cap) is the answer
            break
        if low is None:  # nothing fits yet: halve below the smallest run
            candidate = high // 2
            continue
        if high - low <= max(256, low // 50):  # within 2% (or 256 tokens): close enough
            break
        high_weight = high_weight / 2 if candidate == low else 1.0
        over = (runs[high] - usable) * high_weight
        candidate = low + (usable - runs[low]) * (high - low) / (usable - runs[low] + over)
    fitting = [t for t, peak in runs.items() if peak <= usable]
    shown = ", ".join(f"{t:,}" for t in sorted(runs))
    if not fitting:
        return None, f"none: no micro-batch fits (runs at {shown} tokens)"
    budget = max(fitting)
    capped = f"; capped at {MAX_BUDGET_TOKENS:,}" if budget == MAX_BUDGET_TOKENS else ""
    return budget, f"the largest fitting of runs at {shown} tokens (linear fit, then chords){capped}"


def step_flops(planner: Planner, hf_config, tokens: int) -> float:
    """FLOPs of one micro-batch's forward and backward on one GPU (with sequence parallelism N: a group's row of
    `tokens` tokens, of which each of its N GPUs computes 1/N: tokens/N through the dense layers, heads/N in
    attention).

    Dense: 2 x non-embedding parameters x tokens a forward (no lm_head: the score head is one column); backward
    2x that (full fine-tuning: input and weight gradients) or 1x (LoRA: frozen weights get no weight gradient).
    Attention: 4 x heads x head_dim x causal (query, key) pairs a layer and forward, backward 2x. Gradient
    checkpointing adds one forward."""
    lengths = conversation_lengths(tokens, planner.config.data.max_length)
    dense = 2 * (planner.scaled("parameters") - planner.first.embedding_parameters) * tokens
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    attention_flops = 4 * heads * head_dim * planner.layers * sum(n * (n + 1) / 2 for n in lengths)
    backward = (1 if planner.first.lora_settings is not None else 2) * dense + 2 * attention_flops
    recompute = dense + attention_flops if planner.config.model.enable_gradient_checkpointing else 0
    return (dense + attention_flops + backward + recompute) / sequence_parallel_size(planner.config)


# ----------------------------------------------------------------------------- the plan as a dict


def gib(value: float) -> float:
    return round(value / GIB, 3)


def read_hf_config(model_config):
    """The model's config.json only (no weights), set up for a value head."""
    path = model_config.partial_pretrain
    try:
        return modeling.value_head_config(path, trust_remote_code=model_config.trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PreflightError(
            f"model.partial_pretrain={path}: cannot read its config.json ({first_line}); "
            "give a local model directory or a reachable hub id"
        ) from None


def describe(planner: Planner, settings: PlanSettings, tokens: int) -> dict:
    """What was planned: the model, its sharding and precision, the micro-batch."""
    config, first = planner.config, planner.first
    notes = []
    if config.model.strategy == "fsdp":
        notes.append("model.strategy=fsdp (FSDP1) planned as FSDP2: the same sharding of parameters, grads, state")
    if config.model.fsdp_config.cpu_offload:
        notes.append("cpu_offload: sharded params, grads and optimizer state counted in host memory")
    if len(planner.simulations) > 1:
        notes.append(
            f"simulated {' and '.join(map(str, planner.simulations))} layers; parts scaled to {planner.layers}"
        )
    sp_size = sequence_parallel_size(config)
    if sp_size > 1:
        notes.append(
            f"{sequence_parallel.KEY}={sp_size}: each row of {tokens:,} tokens split over {sp_size} GPUs "
            f"({-(-tokens // sp_size):,} tokens each through the decoder; attention over the whole row with 1/{sp_size} "
            "of the heads, all-to-all buffers included); the token budget is per sequence-parallel group"
        )
    simulated = len(simulated_lengths(tokens, config.data.max_length))
    if simulated < len(conversation_lengths(tokens, config.data.max_length)):
        notes.append(f"simulated as {simulated} longer conversations (the same tokens; simulated_lengths)")
    return {
        "model": config.model.partial_pretrain,
        "model_class": first.class_name,
        "lora": first.lora_settings is not None,
        "layers": planner.layers,
        "layers_simulated": list(planner.simulations),
        "parameters": int(planner.scaled("parameters")),
        "trainable_parameters": int(planner.scaled("trainable_parameters")),
        "layout": first.layout,
        "gradient_checkpointing": bool(config.model.enable_gradient_checkpointing),
        "compute_dtype": str(modeling.resolve_param_dtype(config.model.mixed_precision, settings.device)),
        "master_dtype": config.model.fsdp_config.model_dtype,
        "tokens": tokens,  # per micro-batch: with sequence parallelism, one row of a group (split over its GPUs)
        "sequence_parallel_size": sp_size,
        "tokens_per_gpu": -(-tokens // sp_size),
        "conversations": len(conversation_lengths(tokens, config.data.max_length)),
        "lone_pair_tokens": 2 * int(config.data.max_length),
        "notes": notes,
    }


def memory_figures(planner: Planner, tokens: int) -> tuple[dict, float]:
    """The per-GPU memory part of the plan, and the forward/backward peak in bytes (for search_budget)."""
    settings = planner.settings
    phases = {
        "forward_backward": planner.on_gpu(planner.forward_backward(tokens), "forward_backward"),
        "optimizer_step": planner.on_gpu(planner.optimizer_step()[0], "optimizer_step"),
    }
    peak_phase = max(phases, key=lambda name: phases[name][0])
    peak, parts, corrections = phases[peak_phase]
    resident = planner.optimizer_step()[1]
    model_states = sum(resident[k] for k in MODEL_STATE_PARTS)
    host = model_states if planner.config.model.fsdp_config.cpu_offload else 0.0
    tracked = sum(parts.values())
    figures = {
        "peak_gib": gib(peak),
        "peak_phase": peak_phase,
        "tracked_peak_gib": gib(tracked),
        # what torch.cuda.max_memory_allocated / max_memory_reserved should show (peak_gib adds the CUDA context)
        "allocated_peak_gib": gib(tracked + corrections.get("prefetched_layers", 0.0)),
        "reserved_peak_gib": gib(peak - corrections.get("cuda_context", 0.0)),
        "model_states_gib": gib(model_states),
        "model_states_bytes": int(round(model_states)),
        "activations_gib": gib(phases["forward_backward"][1]["activations"]),
        "host_memory_gib": gib(host),
        "parts": {k: gib(v) for k, v in parts.items() if v},
        "corrections": {k: gib(v) for k, v in corrections.items()},
        "phases": {  # GiB to the KiB: the CLI's table shows small models in MiB
            name: {
                "peak_gib": round(p / GIB, 6),
                "parts": {k: round(v / GIB, 6) for k, v in gpu.items() if v},
                "corrections": {k: round(v / GIB, 6) for k, v in corr.items()},
            }
            for name, (p, gpu, corr) in phases.items()
        },
        "fits": peak <= settings.usable_bytes,
    }
    return figures, phases["forward_backward"][0]


def throughput(planner: Planner, hf_config, settings: PlanSettings, tokens: int) -> dict:
    flops = step_flops(planner, hf_config, tokens)
    figures = {"step_flops": flops, "step_tflops": round(flops / 1e12, 2), "mfu_assumption": None, "peak_tflops": None}
    figures.update(predicted_tokens_per_s=None, predicted_tokens_per_s_all_gpus=None)
    if settings.device == "cuda":  # the MFU assumption is about GPUs; a CPU rate would be a guess
        # a row of `tokens` takes its group's N GPUs the time of one GPU's share of FLOPs: tokens / N per GPU
        per_gpu = tokens / sequence_parallel_size(planner.config) / (flops / (MFU_ASSUMPTION * PEAK_TFLOPS * 1e12))
        figures.update(mfu_assumption=MFU_ASSUMPTION, peak_tflops=PEAK_TFLOPS)
        figures.update(
            predicted_tokens_per_s=round(per_gpu), predicted_tokens_per_s_all_gpus=round(per_gpu * settings.gpus)
        )
    return figures


# ----------------------------------------------------------------------------- API


def plan_config(
    config,
    *,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    margin: float | None = None,
    tokens: int | None = None,
    device: str | None = None,
    search: bool = True,
    suggest: bool = False,
) -> dict:
    """The plan (the CLI's JSON line, as a dict) of a composed config (DictConfig) on `gpus` GPUs.

    tokens: the micro-batch simulated (default: default_tokens). device: cuda or cpu (default from trainer.device).
    search=False skips the budget search (max_tokens_per_micro_batch is then None): a third of the time.
    suggest=True: when it does not fit, `suggestions` lists the changes that do, each planned (suggest_changes;
    up to MAX_SUGGESTION_PLANS more plans); otherwise `suggestions` is [] (it fits) or None (not asked).
    Beside an initialised process group it runs in a subprocess (module docstring)."""
    from btrm.schema import check_config

    settings = resolve_settings(config, gpus=gpus, gpu_memory_gib=gpu_memory_gib, margin=margin, device=device)
    check_config(config, world_size=settings.gpus)
    tokens = int(tokens) if tokens is not None else default_tokens(config)
    conversation_lengths(tokens, config.data.max_length)  # refuses a micro-batch without a pair
    if dist.is_available() and dist.is_initialized():
        return plan_in_subprocess(config, settings, tokens, search, suggest)
    start = time.perf_counter()
    hf_config = read_hf_config(config.model)
    sp_size = sequence_parallel_size(config)
    try:
        sequence_parallel.check_heads(hf_config, sp_size)
    except ValueError as error:
        raise PreflightError(str(error)) from None
    with fake_world(settings.gpus, settings.device, sp_size) as world, warnings.catch_warnings():
        # FSDP2 warns that the root returns a view (the logits' reward column): true of the trainer too, harmless
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
        planner = Planner(config, hf_config, settings, world)
        memory, fb_peak = memory_figures(planner, tokens)
        budget, method = search_budget(planner, tokens, fb_peak) if search else (None, "not searched (search=False)")
        result = {
            "gpus": settings.gpus,
            "device": settings.device,
            "gpu_memory_gib": round(settings.gpu_memory_gib, 3),
            "gpu_memory_assumed": settings.gpu_memory_assumed,
            "margin": settings.margin,
            "usable_gib": gib(settings.usable_bytes),
            **memory,
            "max_tokens_per_micro_batch": budget,
            "max_tokens_method": method,
            **describe(planner, settings, tokens),
            **throughput(planner, hf_config, settings, tokens),
        }
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if not suggest:
        result.update(suggestions=None, suggestions_method="not asked (suggest=False, --no-suggestions)")
    elif result["fits"]:
        result.update(suggestions=[], suggestions_method="it fits: nothing to suggest")
    else:
        result.update(suggest_changes(config, settings, result, getattr(hf_config, "num_attention_heads", None)))
    return result


def plan_from_overrides(
    overrides: list[str],
    *,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    margin: float | None = None,
    tokens: int | None = None,
    device: str | None = None,
    search: bool = True,
    suggest: bool = False,
) -> dict:
    """plan_config of trainer.yaml with these Hydra overrides (btrm.schema.compose_config)."""
    from btrm.schema import compose_config

    config = compose_config(overrides)
    return plan_config(
        config,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        margin=margin,
        tokens=tokens,
        device=device,
        search=search,
        suggest=suggest,
    )


def largest_fitting_budget(
    config,
    *,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    margin: float | None = None,
    device: str | None = None,
) -> int | None:
    """The largest data.max_tokens_per_micro_batch whose step fits (None: not even a pair fits); plan_config's."""
    return plan_config(config, gpus=gpus, gpu_memory_gib=gpu_memory_gib, margin=margin, device=device)[
        "max_tokens_per_micro_batch"
    ]


def auto_token_budget(config, world_size: int):
    """data.max_tokens_per_micro_batch=auto on GPUs (launcher, bt_trainer): the largest budget the plan says fits
    this run's GPUs (`world_size` of them, each of the first visible GPU's memory) with trainer.gpu_memory_margin
    kept free, as a batching.TokenBudget. Refuses (PreflightError) when not even a lone longest pair fits."""
    result = plan_config(config, gpus=world_size, device="cuda")  # the memory: the visible GPU's
    budget = result["max_tokens_per_micro_batch"]
    if budget is None or budget < result["lone_pair_tokens"]:
        fits = f"{budget:,} tokens per micro-batch" if budget else f"no micro-batch ({result['max_tokens_method']})"
        step_alone = result["phases"]["optimizer_step"]["peak_gib"] > result["usable_gib"]
        fused = "optim.fused=true (no foreach temporaries), " * step_alone
        raise PreflightError(
            f"data.max_tokens_per_micro_batch=auto: the memory plan's peak is {result['peak_gib']:.1f} GiB per GPU "
            f"at {result['tokens']:,} tokens, with {result['usable_gib']:.1f} of {result['gpu_memory_gib']:g} GiB usable "
            f"({result['margin']:.0%} kept free, trainer.gpu_memory_margin); it fits {fits} on {world_size} GPUs, "
            f"less than a lone pair of 2 x data.max_length = {result['lone_pair_tokens']:,} tokens; lower "
            f"data.max_length or trainer.gpu_memory_margin, or use {fused}{sequence_parallel.KEY} (rows split over "
            "GPUs), LoRA (model.lora_rank), "
            "model.fsdp_config.cpu_offload=true or more GPUs (bash run_bt_rm.sh --plan shows the parts and plans each)"
        )
    return batching.TokenBudget(
        budget,
        f"auto: the memory plan's largest fitting budget ({result['gpus']} GPUs of {result['gpu_memory_gib']:g} GiB, "
        f"{result['margin']:.0%} kept free"
        + (
            f"; per row of a sequence-parallel group of {result['sequence_parallel_size']} GPUs)"
            if result.get("sequence_parallel_size", 1) > 1
            else ")"
        ),
    )


def plan_in_subprocess(config, settings: PlanSettings, tokens: int, search: bool = True, suggest: bool = False) -> dict:
    """plan_config in a fresh `python -m btrm.plan_cli` (for callers whose own process group is initialised)."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory(prefix="btrm-plan-") as folder:
        config_file = Path(folder) / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(config))
        command = [sys.executable, "-m", "btrm.plan_cli", "--config-yaml", str(config_file), "--tokens", str(tokens)]
        command += ["--gpus", str(settings.gpus), "--gpu-memory", repr(settings.gpu_memory_gib)]
        command += [
            "--margin",
            repr(settings.margin),
            "--device",
            settings.device,
            *([] if search else ["--no-search"]),
            *([] if suggest else ["--no-suggestions"]),
        ]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"planning in a subprocess failed (exit status {done.returncode}): {last}")
    result = json.loads(lines[-1])
    result["gpu_memory_assumed"] = settings.gpu_memory_assumed  # the subprocess was given the size
    return result


# ----------------------------------------------------------------------------- what would fit

# The changes tried when a configuration does not fit, cheapest to the user first: tier 0 changes nothing that is
# computed (a fused optimizer, a smaller token budget, less memory kept free), tier 1 computes the same thing more
# slowly, tier 2 changes what is trained or on what, tier 3 needs more hardware. Within a tier, the order of
# SUGGESTERS. Each change is planned for real (plan_config of the changed config), and only changes that fit are
# suggested. Ulysses sequence parallelism (ulysses_sequence_parallel_size) is tier 1, before CPU offload: the
# smallest size that divides the GPUs and the heads and fits.
TIERS = {
    0: "the same training",
    1: "the same training, slower",
    2: "changes what is trained",
    3: "more hardware",
}
MIN_SUGGESTED_MARGIN = 0.02  # a margin below 2% leaves nothing for what the plan does not see
SUGGESTED_LORA_RANK = 64  # a common rank for 30B-class reward models; its memory barely depends on the rank
MAX_SUGGESTION_PLANS = 10  # plans (each with its budget search) the suggestions may spend; each is ~1-15 s of CPU
GPUS_PER_NODE = DEFAULT_GPUS  # more GPUs: whole nodes of 8 from 8 GPUs up, else more GPUs in the node


@dataclass(frozen=True)
class Change:
    """A change to the configuration, as the user makes it."""

    label: str  # what the table shows
    tier: int  # TIERS
    cost: str  # what it costs the user
    overrides: tuple[str, ...] = ()  # Hydra overrides: run_bt_rm.sh arguments, after the user's own
    gpus: int | None = None  # another number of GPUs (None: the same)
    environment: tuple[tuple[str, str], ...] = ()  # run_bt_rm.sh knobs for the launch (NNODES, N_GPUS_PER_NODE)
    margin: float | None = None  # the memory kept free planned (None: the same)


def with_overrides(config, overrides: tuple[str, ...]):
    """A copy of the composed config with Hydra overrides applied (Hydra's own grammar for the values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    changed = copy.deepcopy(config)
    with open_dict(changed):
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            OmegaConf.update(changed, override.key_or_group, override.value(), merge=False)
    return changed


class Suggestions:
    """Plans changes of a configuration that does not fit (plan_config's result `base`), at most
    MAX_SUGGESTION_PLANS plans; `entries` holds the changes that fit, in the order SUGGESTERS tried them."""

    def __init__(self, config, settings: PlanSettings, base: dict, heads: int | None = None):
        self.config, self.settings, self.base = config, settings, base
        self.heads = heads  # the model's attention heads (sequence parallelism must divide them)
        self.plans = 0
        self.entries: list[dict] = []
        self.not_fitting: list[str] = []

    def plan(self, change: Change) -> tuple[Change, dict | None]:
        """(the change, the plan of the changed configuration); the plan is None when it is refused or the plans
        are spent. A change to a configuration whose budget is not `auto` keeps that budget; where the budget then
        overflows but a pair fits, the change gets the largest budget that fits added to it and is planned again."""
        if self.plans >= MAX_SUGGESTION_PLANS:
            return change, None
        self.plans += 1
        settings = self.settings
        try:
            result = plan_config(
                with_overrides(self.config, change.overrides),
                gpus=change.gpus or settings.gpus,
                gpu_memory_gib=settings.gpu_memory_gib,
                margin=settings.margin if change.margin is None else change.margin,
                device=settings.device,
            )
        except PreflightError as error:
            self.not_fitting.append(f"{change.label} (refused: {error})")
            return change, None
        budget = result["max_tokens_per_micro_batch"]
        explicit = self.config.data.max_tokens_per_micro_batch != "auto"
        setting = "data.max_tokens_per_micro_batch"
        set_already = any(o.startswith(setting + "=") for o in change.overrides)
        if not result["fits"] and explicit and not set_already and budget and budget >= result["lone_pair_tokens"]:
            overrides, label = (*change.overrides, f"{setting}={budget}"), f"{change.label}, {setting}={budget}"
            return self.plan(dataclasses.replace(change, overrides=overrides, label=label))
        return change, result

    def add(self, change: Change, result: dict | None) -> bool:
        """Keeps the change if its plan fits; True if it does."""
        if result is None:
            return False
        if not result["fits"]:
            self.not_fitting.append(f"{change.label} (peak {size(result['peak_gib'])})")
            return False
        gpus = change.gpus or self.settings.gpus
        plan_arguments = [f"--gpus={gpus}", f"--gpu-memory={self.settings.gpu_memory_gib:g}"]
        if change.margin is None and self.settings.margin != float(self.config.trainer.gpu_memory_margin):
            plan_arguments.append(f"--margin={self.settings.margin:g}")  # the base plan's --margin
        environment = dict(change.environment)
        launch = " ".join([*(f"{k}={v}" for k, v in environment.items()), "bash run_bt_rm.sh", *change.overrides])
        self.entries.append(
            {
                "change": change.label,
                "tier": change.tier,
                "tier_meaning": TIERS[change.tier],
                "cost": change.cost,
                "overrides": list(change.overrides),  # Hydra overrides: run_bt_rm.sh arguments after your own
                "environment": environment,  # run_bt_rm.sh knobs
                "gpus": gpus,
                "margin": result["margin"],
                "command": launch,  # with your own arguments added
                "plan_command": " ".join(["bash run_bt_rm.sh --plan", *plan_arguments, *change.overrides]),
                "fits": True,
                **{key: result[key] for key in SUGGESTION_FIGURES},
            }
        )
        return True

    def try_change(self, change: Change) -> bool:
        return self.add(*self.plan(change))


SUGGESTION_FIGURES = (
    "peak_gib",
    "usable_gib",
    "tokens",
    "max_tokens_per_micro_batch",
    "host_memory_gib",
    "predicted_tokens_per_s",
    "predicted_tokens_per_s_all_gpus",
)


def suggest_fused_optimizer(s: Suggestions) -> None:
    """Where the optimizer step is what overflows and it holds temporaries: the fused kernel has none."""
    step = s.base["phases"]["optimizer_step"]
    if (
        step["peak_gib"] > s.base["usable_gib"]
        and step["parts"].get("optimizer_step_temps")
        and not s.config.optim.fused
    ):
        cost = "none: the same update in one fused kernel, without foreach's temporary as large as the parameters"
        s.try_change(Change("optim.fused=true", 0, cost, ("optim.fused=true",)))


def suggest_token_budget(s: Suggestions) -> None:
    """An explicit budget (or pair count) above what fits, where a lone pair fits: the largest budget that fits."""
    budget = s.base["max_tokens_per_micro_batch"]
    if s.config.data.max_tokens_per_micro_batch != "auto" and budget and budget >= s.base["lone_pair_tokens"]:
        setting = f"data.max_tokens_per_micro_batch={budget}"
        s.try_change(Change(setting, 0, "none: smaller micro-batches, more of them per step (same pairs)", (setting,)))


def suggest_margin(s: Suggestions) -> None:
    """The most memory kept free at which the planned peak fits, to the whole percent."""
    peak, memory = s.base["peak_gib"], s.settings.gpu_memory_gib
    margin = math.floor(round((1 - peak / memory) * 100, 6)) / 100
    if MIN_SUGGESTED_MARGIN <= margin < s.settings.margin:
        setting = f"trainer.gpu_memory_margin={margin:g}"
        cost = f"less headroom ({margin:.0%} of each GPU kept free) for what the plan does not see"
        s.try_change(Change(setting, 0, cost, (setting,), margin=margin))


def suggest_gradient_checkpointing(s: Suggestions) -> None:
    if not s.config.model.enable_gradient_checkpointing:
        setting = "model.enable_gradient_checkpointing=true"
        s.try_change(Change(setting, 1, "one more forward per step (~30% more compute)", (setting,)))


def suggest_sequence_parallel(s: Suggestions) -> None:
    """Ulysses sequence parallelism: the smallest N above the current one that divides the GPUs and the attention
    heads and whose plan fits (each row's activations split over N GPUs); packed and shared layouts only, and
    nothing where the optimizer step alone overflows (sequence parallelism leaves the model states as they are)."""
    if not s.config.use_remove_padding or s.base["phases"]["optimizer_step"]["peak_gib"] > s.base["usable_gib"]:
        return
    current, gpus, heads = sequence_parallel_size(s.config), s.settings.gpus, s.heads
    for size in range(current + 1, gpus + 1):
        if gpus % size or not heads or heads % size:
            continue
        setting = f"{sequence_parallel.KEY}={size}"
        groups = f"{gpus // size} data-parallel group" + ("s" if gpus // size > 1 else "")
        cost = f"each row split over {size} GPUs (all-to-alls in attention; {groups})"
        if s.try_change(Change(setting, 1, cost, (setting,))):
            return


def suggest_cpu_offload(s: Suggestions) -> None:
    if not s.config.model.fsdp_config.cpu_offload:
        setting = "model.fsdp_config.cpu_offload=true"
        cost = "host memory for the model states; slower steps (transfers over PCIe; not in the predicted tokens/s)"
        s.try_change(Change(setting, 1, cost, (setting,)))


def suggest_max_length(s: Suggestions) -> None:
    """Where a lone pair exceeds the largest budget found: the longest conversation (a multiple of 256) whose lone
    pair fits that budget, then half of it if that does not fit; nothing when no budget fits."""
    budget, current = s.base["max_tokens_per_micro_batch"], int(s.config.data.max_length)
    if not budget or budget < 512 or budget >= s.base["lone_pair_tokens"]:  # none fits, or a pair does already
        return
    length = min(budget // 2 // 256 * 256, current - 256)
    for _ in range(2):
        if length < 256:
            return
        setting = f"data.max_length={length}"
        cost = f"conversations over {length:,} tokens truncated (data.truncation) or refused"
        if s.try_change(Change(setting, 2, cost, (setting,))):
            return
        length = length // 2 // 256 * 256


def suggest_lora(s: Suggestions) -> None:
    if int(s.config.model.lora_rank) == 0:
        setting = f"model.lora_rank={SUGGESTED_LORA_RANK}"
        cost = "trains adapters and the score head, not every weight (usually with a higher optim.lr)"
        s.try_change(Change(setting, 2, cost, (setting,)))


def suggest_more_gpus(s: Suggestions) -> None:
    """Twice the GPUs, then four times: whole nodes of GPUS_PER_NODE from GPUS_PER_NODE up, else more in the node."""
    gpus = s.settings.gpus
    for factor in (2, 4):
        more = gpus * factor
        if gpus % GPUS_PER_NODE == 0:
            label, knob = f"{more} GPUs ({more // GPUS_PER_NODE} nodes)", ("NNODES", str(more // GPUS_PER_NODE))
        elif more <= GPUS_PER_NODE:
            label, knob = f"{more} GPUs (one node)", ("N_GPUS_PER_NODE", str(more))
        else:
            return
        nodes = knob[0] == "NNODES"
        cost = f"{factor}x the GPUs" + (" (run on every node with NODE_RANK and MASTER_ADDR set)" if nodes else "")
        if s.try_change(Change(label, 3, cost, gpus=more, environment=(knob,))):
            return


SUGGESTERS = (
    suggest_fused_optimizer,
    suggest_token_budget,
    suggest_margin,
    suggest_gradient_checkpointing,
    suggest_sequence_parallel,
    suggest_cpu_offload,
    suggest_max_length,
    suggest_lora,
    suggest_more_gpus,
)


def suggest_changes(config, settings: PlanSettings, base: dict, heads: int | None = None) -> dict:
    """What would fit a configuration that does not (plan_config's result `base`): {"suggestions": the changes
    that fit, cheapest first (TIERS), each planned; "suggestions_method": how many plans, what did not fit}."""
    start = time.perf_counter()
    suggestions = Suggestions(config, settings, base, heads)
    for suggester in SUGGESTERS:
        suggester(suggestions)
    method = f"{suggestions.plans} plans of single changes in {time.perf_counter() - start:.0f} s"
    if suggestions.not_fitting:
        method += "; did not fit: " + "; ".join(suggestions.not_fitting)
    if suggestions.plans >= MAX_SUGGESTION_PLANS:
        method += f"; stopped at {MAX_SUGGESTION_PLANS} plans (MAX_SUGGESTION_PLANS)"
    return {"suggestions": suggestions.entries, "suggestions_method": method}


# ----------------------------------------------------------------------------- the report


def format_parts_table(result: dict) -> list[str]:
    """Per-GPU memory of both phases, part by part, then corrections and the peak (MiB below 1 GiB)."""
    phases = result["phases"]
    unit, scale = ("GiB", 1) if result["peak_gib"] >= 1 else ("MiB", 1024)
    names = [
        n for n in [*TRACKER_PARTS.values(), "optimizer_step_temps"] if any(n in p["parts"] for p in phases.values())
    ]
    lines = [f"  {'per GPU, ' + unit:<28}{'forward/backward':>18}{'optimizer step':>16}"]

    def cells(values: list[float | None]) -> str:
        return "".join(f"{'' if v is None else f'{v * scale:.2f}':>{w}}" for v, w in zip(values, (18, 16), strict=True))

    def row(label: str, key: str, section: str) -> str:
        return f"  {label:<28}" + cells([phases[p][section].get(key) for p in ("forward_backward", "optimizer_step")])

    lines += [row(name.replace("_", " "), name, "parts") for name in names]
    totals = [sum(phases[p]["parts"].values()) for p in ("forward_backward", "optimizer_step")]
    lines.append(f"  {'= tracked tensors':<28}" + cells(totals))
    labels = {
        "prefetched_layers": f"+ {PREFETCHED_LAYERS} prefetched layer (GPU)",
        "allocator_fragmentation": f"+ allocator {ALLOCATOR_FRAGMENTATION:.0%} (GPU)",
        "cuda_context": "+ CUDA context, NCCL (GPU)",
    }
    corrections = [k for k in labels if any(k in p["corrections"] for p in phases.values())]
    lines += [row(labels[k], k, "corrections") for k in corrections]
    lines.append(f"  {'= peak':<28}" + cells([phases[p]["peak_gib"] for p in ("forward_backward", "optimizer_step")]))
    return lines


def count(number: float) -> str:
    """A parameter count as people say it: 32.0 B, 123 M, 255 k."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.3g} {suffix}"
    return f"{number:.0f}"


def size(value_gib: float) -> str:
    return f"{value_gib:.2f} GiB" if value_gib >= 1 else f"{value_gib * 1024:.2f} MiB"


def format_report(result: dict) -> str:
    """The human-readable plan (the CLI prints it above the JSON line)."""
    r = result
    per = "GPU" if r["device"] == "cuda" else "rank"
    memory = f"{r['gpu_memory_gib']:g} GiB" + (
        " (assumed: no GPU visible; --gpu-memory sets it)" if r["gpu_memory_assumed"] else ""
    )
    peak = max(phase["peak_gib"] for phase in r["phases"].values())
    budget = r["max_tokens_per_micro_batch"]
    sp_size = r.get("sequence_parallel_size", 1)
    split = (
        f"; sequence parallelism {sp_size} (each row over {sp_size} GPUs, {r['tokens_per_gpu']:,} tokens each)"
        if sp_size > 1
        else ""
    )
    per_group = f" per sequence-parallel group of {sp_size} GPUs (a row)" if sp_size > 1 else ""
    lines = [
        f"bt-rm plan: {r['model']} as {r['model_class']}",
        f"  {r['layers']} layers, {count(r['parameters'])} parameters ({count(r['trainable_parameters'])} trained); "
        f"FSDP2 over {r['gpus']} ranks ({r['device']}); compute {r['compute_dtype'].removeprefix('torch.')}, "
        f"master weights and optimizer state {r['master_dtype']}; gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'}; layout {r['layout']}{split}",
        f"  micro-batch: {r['tokens']:,} tokens as {r['conversations']} conversations (data.max_length caps one); "
        f"simulated on fake tensors in {r.get('wall_s', '?')} s",
        *(f"  note: {note}" for note in r["notes"]),
        "",
        *format_parts_table(r),
        "",
        f"peak {size(peak)} per {per} ({r['peak_phase'].replace('_', ' ')}) of {memory}; usable with margin "
        f"{r['margin']:.0%}: {size(r['usable_gib'])} -> {'FITS' if r['fits'] else 'DOES NOT FIT'}",
        f"model states {size(r['model_states_bytes'] / GIB)}, activations "
        f"{size(r['phases']['forward_backward']['parts'].get('activations', 0.0))} per {per}",
        f"largest token budget that fits: {'none' if budget is None else f'{budget:,}'}{per_group} "
        f"({r['max_tokens_method']})",
    ]
    if budget is not None and budget < r["lone_pair_tokens"]:
        lines.append(
            f"  a lone pair of 2 x data.max_length = {r['lone_pair_tokens']:,} tokens exceeds it: lower data.max_length"
            + (" or split rows over more GPUs (ulysses_sequence_parallel_size)" if r["layout"] != "padded" else "")
        )
    recompute = " + checkpoint recompute" if r["gradient_checkpointing"] else ""
    share = f"; each GPU's 1/{sp_size} of the row" if sp_size > 1 else ""
    lines.append(f"compute: {r['step_flops'] / 1e12:,.4g} TFLOP per micro-batch (forward + backward{recompute}{share})")
    if r["predicted_tokens_per_s"] is not None:
        lines[-1] += (
            f"; at {r['mfu_assumption']:.0%} MFU of {r['peak_tflops']:g} TFLOP/s: {r['predicted_tokens_per_s']:,} tokens/s "
            f"per GPU, {r['predicted_tokens_per_s_all_gpus']:,} on {r['gpus']}"
        )
    if r["device"] == "cuda":
        lines.append(
            f"GPU corrections (estimates, not calibrated on a GPU): CUDA context + NCCL {CUDA_CONTEXT_GIB:g} GiB, "
            f"allocator fragmentation {ALLOCATOR_FRAGMENTATION:.0%}, {PREFETCHED_LAYERS} prefetched layer"
        )
    if r.get("suggestions") is not None and not r["fits"]:
        lines += ["", *format_suggestions(r)]
    return "\n".join(lines)


def format_suggestions(result: dict) -> list[str]:
    """The changes that would fit, one a row, cheapest first (TIERS), and how to use them."""
    suggestions = result["suggestions"]
    tiers = "; ".join(f"{tier} = {meaning}" for tier, meaning in TIERS.items())
    lines = [f"what would fit: each change planned like the above; cheapest first (tier {tiers})"]
    if not suggestions:
        return [*lines, f"  no change tried fits ({result['suggestions_method']})"]
    unit, scale = ("GiB", 1) if result["usable_gib"] >= 1 else ("MiB", 1024)
    peak = f"peak {unit}"
    lines.append(f"  {'change':<40}{'tier':>5}{peak:>10}{'usable':>8}{'largest budget':>16}{'tokens/s/GPU':>14}  cost")
    for s in suggestions:
        budget = "none" if s["max_tokens_per_micro_batch"] is None else f"{s['max_tokens_per_micro_batch']:,}"
        rate = "" if s["predicted_tokens_per_s"] is None else f"{s['predicted_tokens_per_s']:,}"
        lines.append(
            f"  {s['change']:<40}{s['tier']:>5}{s['peak_gib'] * scale:>10.2f}{s['usable_gib'] * scale:>8.2f}"
            f"{budget:>16}{rate:>14}"
            f"  {s['cost']}"
        )
    lines.append(f"  ({result['suggestions_method']})")
    lines.append("  to use one: its `command` in the JSON (add your own arguments); to check it: its `plan_command`")
    return lines
