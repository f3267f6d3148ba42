"""`DistributedBackend`: the learner as N data-parallel ranks under torch.distributed, with FSDP2.

Rank 0 is the turnwise process itself: it owns the runtime server, dispatch, logging and the
sampler, and drives the other ranks, which only train. `RankGroup` starts ranks 1..N-1 with
`torch.multiprocessing` (spawn) on this machine and joins them in one process group: `gloo` on the
CPU, `nccl` on CUDA (one GPU per rank), plus a `gloo` group that carries the commands. We spawn
rather than ask users for `torchrun` so that `turnwise train` stays one command whose process is
rank 0 (it must be: the runtime, the sampler and the agents live there), and so that tests start a
group in-process. Under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR set: several machines, or
one) nothing is spawned: `turnwise train` on rank 0 runs the job and on every other rank serves
it (`serve_launched_rank`); see the README for the multi-node command (not testable here).

Every rank wraps its copy of the policy in `policy.logprobs.TokenLogprobs` and shards it with
`fully_shard` (each decoder layer, then the wrapper: embeddings, output layer and final norm), so
parameters, gradients and Adam's state are split over the ranks; with a compute dtype below fp32,
`MixedPrecisionPolicy` gathers parameters in it and reduces gradients in fp32 (fp32 masters).
Each rank runs a `train.backend.LocalBackend` over its FSDP2 model.

One `forward_backward` over datums d_1..d_D (s_i = loss tokens of d_i for token-mean, 1 for the
sequence aggregations, S = sum_i s_i over the WHOLE batch):

- the datums are split by token count (longest first, each to the least-loaded rank), so ranks
  stay balanced;
- rank r back-propagates sum over its micro-batches m of N * (s_m / S) * loss_m; FSDP2's gradient
  reduce-scatter averages over the N ranks, so the sharded gradient is sum_m (s_m / S) grad loss_m
  over the whole batch: exactly the one-process gradient (`LocalBackend`), up to float summation order;
- every rank runs as many micro-batches as the busiest one (collectives must pair up); the
  others pad with zero-weight passes over the batch's shortest datum.

Weight sync gathers on rank 0: the adapters only with LoRA (`DTensor.full_tensor` per adapter
tensor), else the full state dict (`get_model_state_dict(full_state_dict=True)`). Checkpoints are
the one-process format (a Hugging Face model or LoRA adapter directory, and the optimizer state by
parameter name), so a run saved with N ranks resumes with any other number.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import heapq
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from turnwise.backends import WeightSyncSampler
from turnwise.config import ModelConfig
from turnwise.policy.checkpoint import apply_lora, is_lora, save_checkpoint
from turnwise.policy.logprobs import TokenLogprobs
from turnwise.track.names import reduce_micro_batches
from turnwise.train.backend import LocalBackend, loss_sizes
from turnwise.types import AdamParams, Datum, LossOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class LearnerSpec:
    """What every rank needs to build its learner (rank 0 sends it; weights follow by broadcast)."""

    model: ModelConfig
    """Where the architecture is read from (its weights are replaced by rank 0's)."""
    lora: tuple[int, int] | None
    """(rank, alpha) of the adapters, or None for full fine-tuning."""
    compute_dtype: str
    micro_batch_size: int
    temperature: float = 1.0
    kl_reference: bool = False
    activation_checkpointing: bool = False


def split_by_tokens(lengths_D: Sequence[int], ranks: int) -> list[list[int]]:
    """Datum indices per rank, balanced by token count (longest first, to the lightest rank);
    each rank's indices in their original order."""
    heap = [(0, r) for r in range(ranks)]
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(lengths_D)), key=lambda i: -lengths_D[i]):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + lengths_D[i], r))
    return [sorted(ix) for ix in out]


class RankGroup:
    """Ranks 1..N-1 spawned on this machine and the process group with this process as rank 0.

    A context manager; the ranks serve one learner at a time (`DistributedBackend`), so tests and
    jobs that train several policies in a row start the processes once."""

    def __init__(self, world_size: int, *, device_type: str = "cpu", port: int = 0) -> None:
        if world_size < 2:
            raise ValueError(f"a rank group needs at least 2 ranks, got {world_size}")
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"trainer.nproc is {world_size} but torch sees {torch.cuda.device_count()} CUDA "
                             "device(s); one GPU per rank")
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already exists in this process")
        self.world_size, self.device_type = world_size, device_type
        self._procs: list[Any] = []
        if "WORLD_SIZE" in os.environ:  # launched by torchrun: the other ranks already run
            if int(os.environ["WORLD_SIZE"]) != world_size:
                raise ValueError(f"trainer.nproc is {world_size} but torchrun started WORLD_SIZE="
                                 f"{os.environ['WORLD_SIZE']} ranks; set trainer.nproc to match")
            _init(0, world_size, None, device_type)
        else:
            port = port or _free_port()
            ctx = mp.get_context("spawn")
            self._procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, device_type),
                                       name=f"turnwise-rank-{rank}", daemon=True) for rank in range(1, world_size)]
            for p in self._procs:
                p.start()
            _init(0, world_size, port, device_type)
        self.control = dist.new_group(backend="gloo", timeout=_TIMEOUT)
        self.busy = False

    def call(self, command: str, per_rank: Sequence[Any] | None = None, shared: Any = None) -> list[Any]:
        """Run `command` on every rank (this one included) with `per_rank[r]` and `shared`; the results."""
        dead = [p.name for p in self._procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"learner rank process(es) exited: {', '.join(dead)}")
        payloads = [(command, per_rank[r] if per_rank is not None else None, shared) for r in range(self.world_size)]
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, payloads, src=0, group=self.control)
        return _gather(_execute(*mine[0]), self.control)

    def close(self) -> None:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                mine: list[Any] = [None]
                dist.scatter_object_list(mine, [("exit", None, None)] * self.world_size, src=0, group=self.control)
            dist.destroy_process_group()
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DistributedBackend:
    """`TrainingBackend` over a `RankGroup`: this process's `model` is rank 0's copy (module docstring)."""

    def __init__(self, group: RankGroup, model: torch.nn.Module, sampler: WeightSyncSampler | None, *,
                 tokenizer: Any, spec: LearnerSpec) -> None:
        """With LoRA the sampler must run an adapter twin (`policy.checkpoint.adapter_twin`):
        weight sync sends it the adapters only."""
        if group.busy:
            raise RuntimeError("this rank group already serves a learner")
        self.group, self.sampler, self.tokenizer, self.spec = group, sampler, tokenizer, spec
        self.adapter_sync = spec.lora is not None
        self.version = sampler.version if sampler is not None else 0
        self.sync_bytes = 0
        self._changed = True
        _STATE["model"] = model
        group.call("open", shared=spec)
        group.busy = True
        self.learner: LocalBackend = _STATE["learner"]

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    def close(self) -> None:
        if self.group.busy:
            self.group.call("close")
            self.group.busy = False

    # -- TrainingBackend ------------------------------------------------------------------

    def forward_backward(self, datums_D: Sequence[Datum], loss_fn: str,
                         loss_options: LossOptions) -> dict[str, float]:
        sizes = loss_sizes(datums_D, loss_fn, loss_options)
        shards, n_micro, filler = self._split(datums_D)
        per_rank = [([datums_D[i] for i in ix], [sizes[i] for i in ix]) for ix in shards]
        shared = (max(sum(sizes), 1.0), loss_fn, loss_options, n_micro, filler)
        parts = [p for rank_parts in self.group.call("forward_backward", per_rank, shared) for p in rank_parts]
        return reduce_micro_batches(parts)

    def optim_step(self, adam: AdamParams) -> dict[str, float]:
        self._changed = True
        return self.group.call("optim_step", shared=adam)[0]

    @torch.no_grad()
    def forward(self, datums_D: Sequence[Datum]) -> list[tuple[float, ...]]:
        shards, n_micro, filler = self._split(datums_D)
        results = self.group.call("forward", [[datums_D[i] for i in ix] for ix in shards], (n_micro, filler))
        out: list[tuple[float, ...]] = [()] * len(datums_D)
        for ix, logprobs in zip(shards, results, strict=True):
            for i, lp in zip(ix, logprobs, strict=True):
                out[i] = lp
        return out

    def save_weights_for_sampler(self) -> int:
        if self._changed:
            self.version += 1
        self.sync_bytes = 0
        if self.sampler is not None and (self._changed or self.sampler.version != self.version):
            weights = self.group.call("sampler_weights", shared=self.adapter_sync)[0]
            self.sampler.update_weights(weights, version=self.version)
            self.sync_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self._changed = False
        return self.version

    def save_state(self, path: Path) -> None:
        weights, optimizer = self.group.call("full_state")[0]
        lora = is_lora(self.model)
        save_checkpoint(self.model, self.tokenizer, path / "model",
                        state_dict={k: v for k, v in weights.items() if ".lora_" in k} if lora else weights)
        torch.save({"optimizer": optimizer, "policy_version": self.version, "changed": self._changed},
                   path / "backend_state.pt")

    def load_state(self, path: Path) -> None:
        from safetensors.torch import load_file

        model_dir = path / "model"
        name = "adapter_model.safetensors" if is_lora(self.model) else "model.safetensors"
        state = torch.load(path / "backend_state.pt", weights_only=False)
        self.group.call("load", shared=(load_file(model_dir / name), state["optimizer"]))
        self.version, self._changed = state["policy_version"], state["changed"]

    def export(self, path: Path) -> None:
        weights = self.group.call("full_state")[0][0]
        plain = _plain_copy(replace(self.spec, model=self.spec.model.model_copy(update={"device": "cpu"})))
        if is_lora(plain):
            plain.load_state_dict(weights)
            save_checkpoint(plain, self.tokenizer, path, merged=True)
        else:
            _load_full(plain, weights)
            save_checkpoint(plain, self.tokenizer, path)

    # -- pieces ---------------------------------------------------------------------------

    def _split(self, datums_D: Sequence[Datum]) -> tuple[list[list[int]], int, Datum]:
        shards = split_by_tokens([len(d.segment.tokens_T) for d in datums_D], self.group.world_size)
        n_micro = max(math.ceil(len(ix) / self.spec.micro_batch_size) for ix in shards)
        filler = min(datums_D, key=lambda d: len(d.segment.tokens_T))
        return shards, n_micro, filler


# -- every rank -----------------------------------------------------------------------------

_STATE: dict[str, Any] = {}
"""This process's rank, its learner and (on rank 0, before `open`) the policy to shard."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_rank() -> int:
    """This process's rank when `torchrun` started it (RANK set), else 0."""
    return int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ else 0


def serve_launched_rank() -> None:
    """A torchrun rank > 0: serve rank 0's learner commands (one GPU per rank when CUDA is present)."""
    _rank_main(launched_rank(), int(os.environ["WORLD_SIZE"]), None,
               "cuda" if torch.cuda.is_available() else "cpu")


def _init(rank: int, world_size: int, port: int | None, device_type: str) -> None:
    """Join the process group: over 127.0.0.1:`port` (spawned ranks) or torchrun's env:// (port None)."""
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    init = f"tcp://127.0.0.1:{port}" if port is not None else "env://"
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init,
                            rank=rank, world_size=world_size, timeout=_TIMEOUT)
    _STATE.update(rank=rank, device_type=device_type)


def _gather(result: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(result, out if dist.get_rank() == 0 else None, dst=0, group=group)
    return out


def _rank_main(rank: int, world_size: int, port: int | None, device_type: str) -> None:
    """Ranks > 0: serve rank 0's commands until it says exit."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _init(rank, world_size, port, device_type)
    control = dist.new_group(backend="gloo", timeout=_TIMEOUT)
    while True:
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, None, src=0, group=control)
        command, arg, shared = mine[0]
        if command == "exit":
            break
        _gather(_execute(command, arg, shared), control)
    dist.destroy_process_group()


def _execute(command: str, arg: Any, shared: Any) -> Any:
    if command == "open":
        _STATE["learner"] = _open_learner(shared, _STATE.pop("model", None))
        return None
    learner: LocalBackend = _STATE["learner"]
    if command == "close":
        del _STATE["learner"]
        return None
    if command == "forward_backward":
        datums, sizes = arg
        total, loss_fn, options, n_micro, filler = shared
        return learner.accumulate(datums, sizes, total, loss_fn, options, scale=float(dist.get_world_size()),
                                  micro_batches=n_micro, filler=filler)
    if command == "optim_step":
        return learner.optim_step(shared)
    if command == "forward":
        return learner.forward_padded(arg, *shared)
    if command == "sampler_weights":
        if shared:  # adapters only: every rank gathers each (small) adapter tensor
            return {n: p.full_tensor().detach().cpu() for n, p in learner.model.named_parameters() if p.requires_grad}
        return get_model_state_dict(learner.model, options=_FULL)
    if command == "full_state":
        return (get_model_state_dict(learner.model, options=_FULL),
                get_optimizer_state_dict(learner.model, learner.optimizer, options=_FULL))
    if command == "load":
        weights, optimizer = shared
        _load_sharded(learner.model, weights)
        set_optimizer_state_dict(learner.model, learner.optimizer, optimizer,
                                 options=StateDictOptions(full_state_dict=True))
        return None
    raise ValueError(f"unknown learner command {command!r}")


def _open_learner(spec: LearnerSpec, model: torch.nn.Module | None) -> LocalBackend:
    """This rank's FSDP2 learner: rank 0 passes its policy, the others build one; rank 0's weights
    are broadcast to all before sharding."""
    if model is None:
        model = _plain_copy(spec)
    device = next(model.parameters()).device
    for tensor in model.state_dict().values():
        dist.broadcast(tensor.data, src=0)
    compute = _DTYPES[spec.compute_dtype]
    mp_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
        if compute != torch.float32 else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reference = None
    if spec.kl_reference and not is_lora(model):
        reference = _shard(TokenLogprobs(copy.deepcopy(model).eval().requires_grad_(False)), mesh, mp_policy)
    logprobs = _shard(TokenLogprobs(model), mesh, mp_policy)
    return LocalBackend(model, None, tokenizer=None, micro_batch_size=spec.micro_batch_size,
                        temperature=spec.temperature, compute_dtype=compute, logprobs=logprobs,
                        reference_logprobs=reference)


def _shard(wrapper: TokenLogprobs, mesh: Any, mp_policy: MixedPrecisionPolicy) -> TokenLogprobs:
    for layer in wrapper.model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp_policy)
    return wrapper


def _plain_copy(spec: LearnerSpec) -> torch.nn.Module:
    """The policy as rank 0 built it, from the config (random adapters; weights to be replaced)."""
    from turnwise.policy.load import load_policy

    model, _ = load_policy(spec.model)
    if spec.lora is not None:
        model = apply_lora(model, *spec.lora)
    else:
        model.float()  # fp32 master weights
    if spec.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


@torch.no_grad()
def _load_sharded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (by name, a subset is fine) into the local shards of an FSDP2 model."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    for name, value in weights.items():
        key = name if name in params else _peft_name(name, params)
        p = params[key]
        full = value.to(device=p.device, dtype=p.dtype)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full)


def _peft_name(name: str, params: dict[str, Any]) -> str:
    """An adapter file's key (`...lora_A.weight`) as the live parameter's (`...lora_A.default.weight`)."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            candidate = name[: -len(suffix)] + ".default" + suffix
            if candidate in params:
                return candidate
    raise KeyError(f"checkpoint tensor {name!r} is not a parameter of the model")


def _load_full(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(f"state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
