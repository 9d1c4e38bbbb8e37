"""One model learned by N processes: torch.distributed ranks over static partitions.

``torchrun --nproc-per-node N -m app.cli learn --world-size N ...`` starts N ranks of one
learner. They form one process group (gloo on CPU; nccl is not used: the learners synced
here keep numpy state), and:

* **static assignment** -- rank ``r`` of ``N`` owns partitions ``p`` with ``p % N == r``
  (:func:`assign_partitions`), read with ``assign()``, no consumer-group rebalancing;
  fewer partitions than ranks is a :class:`~streams.errors.ConfigError`;
* **one model, synchronous steps** -- every rank starts from rank 0's state; each step a
  rank predicts its own micro-batch and, with the learner in deferred mode
  (``defer_updates()``), only computes that batch's gradient; one all-reduce sums the
  ranks' gradients (a second ORs the touched-coordinate masks where the update needs
  them: SGD with L2), and every rank applies the one optimizer step
  (``apply_update``), so all ranks hold bitwise the same model after every step. That is
  one ``learn_many`` on the union of the ranks' batches, up to the order of the
  floating-point sums: SGD's L2 shrinks each touched weight once (not once per rank that
  touched it), FTRL's ``n`` grows by the square of the summed gradient as in one process.
  (The fallback for a learner with only ``sync_arrays()`` sums each rank's *change* of
  those arrays instead; that equals the union step only where the update is linear in
  the gradient. It is how lr was synced before: it shrank a weight by SGD's L2 once per
  touching rank, and summed FTRL's ``n`` increments as ``sum(g_r**2)`` over ranks rather
  than ``(sum(g_r))**2``, with the matching ``sigma`` terms.)
* **data-parallel mode** -- a learner with ``learn_shard`` (the two-tower, IntTower and
  DAT updaters, whose embedding rows are allocated per id as ids arrive): each rank
  predicts its own micro-batch, the ranks all-gather their micro-batches (a few hundred
  bytes an event) so that every rank knows the step's union, and
  ``learn_shard(union_xs, union_ys, mine, all_reduce)`` uses the union only for the
  non-parameter state (rows for new ids allocated in the union's order, step, expiry,
  negatives drawn, frequency estimate, negative buffer: identical on every rank), runs
  forward and backward on this rank's examples alone, and sums
  ``[dense grads | grads of the step's rows | control counters]`` in ONE all-reduce;
  every rank then applies the same Adam and sparse Adagrad steps, so all ranks hold
  bitwise the same state (:func:`state_digest`). Per-example loss terms (BCE, DAT's
  mimic) are scaled so the summed gradient is the union batch's; the in-batch terms
  (sampled softmax, CIR InfoNCE, DAT category alignment) are per-rank in-batch, as in
  DDP with per-GPU in-batch negatives. Not bitwise equal to a 1-rank run (the float sums
  are ordered otherwise, and the in-batch terms see a rank's batch, not the union);
* **examples mode** -- a learner without those hooks (the CTR baseline; or any learner
  with ``sync_mode="examples"``) is kept as one model by replicated learning: each rank
  predicts its own micro-batch (the prequential test), the ranks all-gather their
  micro-batches and every rank learns their union in partition order -- the same
  ``learn_many`` a 1-rank run of this runtime makes, so every rank holds bitwise the same
  model (:func:`state_digest`). Reading, decoding, validation and the prequential
  predictions are split over the ranks; the learning step itself is repeated on each;
* **one coherent checkpoint** -- at a checkpoint step (agreed through the same
  all-reduce) the ranks gather their offsets, rank 0 writes one ordinary checkpoint with
  the model and every partition's next offset (atomic, fsync'ed), all ranks pass a
  barrier, and only then each rank commits its partitions' offsets to the group;
* **faults** -- a rank that dies breaks the next collective of the others (gloo reports
  the closed connection; ``timeout_s`` bounds any wait), they exit non-zero, and torchrun
  (``--max-restarts``) restarts the group, which resumes from the last checkpoint: rank 0
  reads it and broadcasts model and offsets, every rank seeks its partitions there.

Deterministic steps. A step takes at most ``per_partition`` events from each owned
partition, in offset order, and waits (polling) until each partition has that many or the
poll comes back empty. On a stream already in the topic, the steps -- and so the model --
are the same whatever the restarts; on a live stream they follow arrival.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import pickle
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from learners.base import event_to_x
from learners.checkpoint import flat_offsets, load_checkpoint, nest_offsets, same_learner, save_checkpoint
from learners.evaluate import prequential_step
from learners.runtime import RuntimeStats, metrics_summary
from streams.consumer import EventConsumer
from streams.deadletter import DeadLetterWriter
from streams.errors import ConfigError, StreamsError
from streams.topics import Topics
from streams.transport import KafkaSettings, TopicPartition, make_consumer, make_producer

__all__ = ["GroupError", "assign_partitions", "init_group", "model_digest", "DistributedLearnerRuntime"]

log = logging.getLogger(__name__)

_CONTROL = 4  # learned, stop requested, idle, checkpoint due
_MODES = ("gradient", "delta", "data-parallel", "examples")


class GroupError(StreamsError):
    """The process group could not be formed (a rank did not come within the timeout)."""


def assign_partitions(partitions: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` owns: sorted, every ``world_size``-th.

    >>> assign_partitions(range(6), 1, 4)
    [1, 5]
    """
    parts = sorted(int(p) for p in partitions)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
    if len(parts) < world_size:
        raise ConfigError(
            f"the topic has {len(parts)} partitions but {world_size} ranks were started: every rank needs a "
            f"partition of its own; run at most {len(parts)} ranks or add partitions to the topic"
        )
    return parts[rank::world_size]


def _attempt_store(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> "dist.Store":
    """The group's store at ``host:port``, its keys under this launch attempt's prefix.

    torchrun's agent keeps one store across ``--max-restarts`` restarts, and the default
    ``env://`` init reads the group's keys without a per-attempt prefix: after a rank was
    killed, the survivors of the next attempt read the dead rank's address and gloo's mesh
    is refused. So the keys live under ``TORCHELASTIC_RUN_ID`` and
    ``TORCHELASTIC_RESTART_COUNT``. Under torchrun the agent serves the store (every rank
    is a client); launched by hand, rank 0 serves it.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size, is_master=not agent and rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    attempt = (f"towerstream/{os.environ.get('TORCHELASTIC_RUN_ID', 'manual')}/"
               f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    return dist.PrefixStore(attempt, store)


def init_group(world_size: int, timeout_s: float = 60.0) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); returns ``(rank, world_size)``.

    Raises :class:`~streams.errors.ConfigError` when not launched as ``world_size`` ranks,
    :class:`GroupError` when the group is not complete within ``timeout_s``.
    """
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is None or not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise ConfigError(
            f"--world-size {world_size} needs a launcher: run `torchrun --nproc-per-node {world_size} -m app.cli "
            "learn --world-size ...` (or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        )
    if int(env_world) != world_size:
        raise ConfigError(f"--world-size {world_size} but the launcher started {env_world} ranks: make them agree")
    rank, host, port = os.environ["RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    if not dist.is_initialized():
        try:
            store = _attempt_store(host, int(port), int(rank), world_size, timeout_s)
            dist.init_process_group("gloo", store=store, rank=int(rank), world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, OSError) as exc:  # DistStoreError is a RuntimeError
            raise GroupError(
                f"rank {rank} of {world_size} could not form the group at {host}:{port} within "
                f"{timeout_s:g} s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                "check that every rank was started and that MASTER_ADDR:MASTER_PORT is reachable"
            ) from None
    return dist.get_rank(), dist.get_world_size()


def model_digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over the bytes of ``arrays`` (ranks compare models with it)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def state_digest(state: Any) -> str:
    """sha256 of a learner state, canonically: tensors and arrays by dtype, shape and bytes
    (a pickle of torch tensors is not byte-stable), containers in their order."""
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu().contiguous().numpy()
        if isinstance(obj, np.ndarray):
            h.update(f"nd{obj.dtype.str}{obj.shape}".encode())
            h.update(np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, dict):
            h.update(b"{")
            for k, v in obj.items():
                walk(k)
                walk(v)
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[" if isinstance(obj, list) else b"(")
            for v in obj:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    walk(state)
    return h.hexdigest()


def _by_gradient(learner: Any) -> bool:
    return all(callable(getattr(learner, name, None)) for name in ("defer_updates", "pending_update", "apply_update"))


def _check_learner(learner: Any) -> None:
    if not callable(getattr(learner, "learn_many", None)) or not callable(getattr(learner, "state_dict", None)):
        raise ConfigError(
            f"learner {learner.spec['name']!r} has neither sync hooks nor learn_many/state_dict, so its ranks "
            "cannot share one model: run it as one process"
        )


def _sync_mode(learner: Any, wanted: str | None = None) -> str:
    """``gradient`` (summed gradients, one step), ``delta`` (summed array changes),
    ``data-parallel`` (``learn_shard``: own examples' gradients summed, the union's
    non-parameter state kept on every rank) or ``examples`` (the ranks' micro-batches
    gathered, every rank learns their union). ``wanted`` picks one the learner supports."""
    have = [m for m, ok in (("gradient", _by_gradient(learner)),
                            ("delta", callable(getattr(learner, "sync_arrays", None))),
                            ("data-parallel", callable(getattr(learner, "learn_shard", None))),
                            ("examples", True)) if ok]
    if wanted is None:
        return have[0]
    if wanted not in have:
        raise ConfigError(f"sync mode {wanted!r} is not one learner {learner.spec['name']!r} supports: "
                          f"pick one of {have}")
    return wanted


class DistributedLearnerRuntime:
    """One rank of a learner trained by ``world_size`` processes (see the module doc).

    Parameters mirror :class:`learners.runtime.StreamLearnerRuntime`; ``max_events`` and
    ``checkpoint_every_n`` count events of all ranks together, ``per_partition`` is the
    most events a step takes from one partition (default ``batch_size`` split over the
    rank's partitions). ``sync_mode`` picks one of the learner's modes (see the module doc;
    ``None``: the first it supports of gradient, delta, data-parallel, examples).
    """

    def __init__(self, settings: KafkaSettings, learner: Any, group_id: str, topics: Topics = Topics(),
                 checkpoint_path: str | Path | None = None, *, batch_size: int = 1000,
                 per_partition: int | None = None, checkpoint_every_n: int | None = None,
                 checkpoint_every_s: float | None = 30.0, max_events: int | None = None,
                 idle_timeout_s: float | None = None, poll_timeout_s: float = 0.5, metrics: Any = None,
                 sync_mode: str | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if not dist.is_initialized():
            raise ConfigError("DistributedLearnerRuntime needs the process group: call init_group first")
        _check_learner(learner)
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.settings, self.learner, self.group_id, self.topics = settings, learner, group_id, topics
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.batch_size, self.per_partition = batch_size, per_partition
        self.checkpoint_every_n, self.checkpoint_every_s = checkpoint_every_n, checkpoint_every_s
        self.max_events, self.idle_timeout_s, self.poll_timeout_s = max_events, idle_timeout_s, poll_timeout_s
        if metrics is None:
            from learners.metrics import PrequentialMetrics

            metrics = PrequentialMetrics()
        self.metrics, self.clock, self.wall_clock = metrics, clock, wall_clock
        self._stop = threading.Event()
        self._offsets: dict[TopicPartition, int] = {}
        self._events_learned = self._learned_run = self._learned_at_checkpoint = 0
        self._checkpoints = self._steps = 0
        self._records = self._skipped = self._dead = 0
        self.comm_s = 0.0  # seconds in the per-step all-reduce (and its copies)
        self.bytes_per_step = 0  # payload of one step's all-reduce, per rank
        self.allreduce_s = 0.0  # seconds inside dist.all_reduce alone (a subset of comm_s)
        self.gather_s = 0.0  # data-parallel: seconds inside the micro-batch all-gather (a subset of allreduce_s)
        self.gather_bytes = self.reduce_bytes = 0  # data-parallel: mean pickled payload / all-reduce bytes a step
        # steps that learned events (group-wide), after the first: their count, wall and CPU seconds, sync share
        # and where a step's wall time goes: reading (poll + take), convert + predict, the sync (learning included)
        self.work = {"steps": 0, "events": 0, "wall_s": 0.0, "cpu_s": 0.0, "comm_s": 0.0, "allreduce_s": 0.0,
                     "fill_s": 0.0, "predict_s": 0.0, "sync_s": 0.0}
        self.warmup = {"events": 0, "wall_s": 0.0, "cpu_s": 0.0}  # the first learning step, kept out of work
        self.resumed = False
        self._resume()
        self.mode = _sync_mode(learner, sync_mode)
        if self.by_gradient:
            learner.defer_updates()
        self._taken: list[tuple[int, int]] = []  # this step's (partition, impressions), in take order
        self._gather_bytes = self._gather_steps = self._reduce_total = 0

    @property
    def by_gradient(self) -> bool:
        """Synced by summed gradients (else: summed deltas of ``sync_arrays()``, or examples)."""
        return self.mode == "gradient"

    # ------------------------------------------------------------------ state

    def _resume(self) -> None:
        """Rank 0 reads the checkpoint (if any) and broadcasts it; every rank starts from it."""
        payload: list[Any] = [None]
        if self.rank == 0:
            if self.checkpoint_path is not None and self.checkpoint_path.exists():
                ck = load_checkpoint(self.checkpoint_path)
                want = {"name": self.learner.spec["name"], "params": dict(self.learner.spec.get("params", {}))}
                if not same_learner({"name": ck.spec["name"], "params": dict(ck.spec.get("params", {}))}, want):
                    raise ConfigError(f"checkpoint {self.checkpoint_path} holds learner {ck.spec}, not {want}: use "
                                      "the same learner and params, or another checkpoint path")
                payload = [(ck.state, ck.offsets, ck.events_learned)]
            else:
                payload = [(self.learner.state_dict(), {}, 0)]
        dist.broadcast_object_list(payload, src=0)
        state, offsets, learned = payload[0]
        self.learner.load_state_dict(state)
        self._offsets = {TopicPartition(t, p): o for (t, p), o in flat_offsets(offsets).items()}
        self._events_learned = self._learned_at_checkpoint = int(learned)
        self.resumed = bool(offsets)
        if self.resumed:
            log.info("rank %d resumed: %d events learned, offsets %s", self.rank, learned, offsets)

    def _arrays(self) -> list[np.ndarray]:
        return list(self.learner.sync_arrays())

    def _sync_examples(self, control: list[float], xs: list[Any], ys: np.ndarray) -> np.ndarray:
        """Examples mode: sum the control counters, gather every rank's micro-batch ``xs, ys``
        (split by partition) and learn their union on every rank, in partition order: the
        same ``learn_many`` a 1-rank run of this runtime makes, so all ranks hold the same model."""
        t0 = time.perf_counter()
        ctl = torch.from_numpy(np.asarray(control, dtype=np.float64))
        t_ar = time.perf_counter()
        dist.all_reduce(ctl, op=dist.ReduceOp.SUM)
        bounds = np.cumsum([0] + [n for _, n in self._taken])
        mine = [(p, xs[a:b], ys[a:b].tolist()) for (p, _), a, b in zip(self._taken, bounds[:-1], bounds[1:])]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        self.allreduce_s += time.perf_counter() - t_ar
        parts = sorted((part for rank_parts in gathered for part in rank_parts), key=lambda part: part[0])
        all_xs = [x for _, px, _ in parts for x in px]
        if all_xs:
            self.learner.learn_many(all_xs, np.fromiter((y for _, _, py in parts for y in py), dtype=np.int64,
                                                        count=len(all_xs)))
            # the mean payload of the steps that learned (an idle step's is a few bytes)
            self._gather_bytes += len(pickle.dumps(mine)) + ctl.numel() * 8
            self._gather_steps += 1
            self.bytes_per_step = self._gather_bytes // self._gather_steps
        self.comm_s += time.perf_counter() - t0
        return ctl.numpy().copy()

    def _gather_union(self, xs: list[Any], ys: np.ndarray) -> tuple[list[Any], np.ndarray, list[int], int]:
        """All-gather every rank's micro-batch (split by partition); returns the union in
        partition order, its labels, the indices of this rank's examples in it and the
        pickled size of this rank's part."""
        bounds = np.cumsum([0] + [n for _, n in self._taken])
        mine = [(p, xs[a:b], ys[a:b].tolist()) for (p, _), a, b in zip(self._taken, bounds[:-1], bounds[1:])]
        gathered: list[Any] = [None] * self.world_size
        t = time.perf_counter()
        dist.all_gather_object(gathered, mine)
        dt = time.perf_counter() - t
        self.gather_s += dt
        self.allreduce_s += dt
        parts = sorted(((part, r) for r, rank_parts in enumerate(gathered) for part in rank_parts),
                       key=lambda pr: pr[0][0])
        all_xs: list[Any] = []
        all_ys: list[int] = []
        own: list[int] = []
        for (_, px, py), r in parts:
            if r == self.rank:
                own.extend(range(len(all_xs), len(all_xs) + len(px)))
            all_xs.extend(px)
            all_ys.extend(py)
        return all_xs, np.asarray(all_ys, dtype=np.int64), own, len(pickle.dumps(mine))

    def _sync_shards(self, control: list[float], xs: list[Any], ys: np.ndarray) -> np.ndarray:
        """Data-parallel mode: gather the micro-batches so every rank knows the union, then
        the learner's ``learn_shard`` learns this rank's part, its gradients and the control
        counters summed in one all-reduce (the learner calls ``reduce`` once)."""
        t0 = time.perf_counter()
        all_xs, all_ys, own, sent = self._gather_union(xs, ys)
        ctl = torch.tensor(control, dtype=torch.float32)  # small counts and flags: exact in float32
        total: list[np.ndarray] = []
        t_learn = [0.0]

        def reduce(flat: torch.Tensor) -> torch.Tensor:
            t_in = time.perf_counter()
            buf = torch.cat([flat.to(torch.float32).reshape(-1), ctl])
            t_ar = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            self.allreduce_s += time.perf_counter() - t_ar
            total.append(buf[-_CONTROL:].double().numpy().copy())
            self._step_reduce_bytes = buf.numel() * buf.element_size()
            t_learn[0] -= time.perf_counter() - t_in  # the exchange is communication, not learning
            return buf[:-_CONTROL]

        if all_xs:
            t_l = time.perf_counter()
            self.learner.learn_shard(all_xs, all_ys, own, reduce)
            t_learn[0] += time.perf_counter() - t_l
        else:
            reduce(torch.zeros(0))
        if len(total) != 1:
            raise RuntimeError(f"learn_shard called all_reduce {len(total)} times in a step, not once")
        if all_xs:
            n = self._gather_steps = self._gather_steps + 1
            self._gather_bytes += sent
            self._reduce_total += self._step_reduce_bytes
            self.gather_bytes, self.reduce_bytes = self._gather_bytes // n, self._reduce_total // n
            self.bytes_per_step = self.gather_bytes + self.reduce_bytes
        self.comm_s += time.perf_counter() - t0 - t_learn[0]
        return total[0]

    def _sync(self, before: list[np.ndarray] | None, n_before: int, control: list[float]) -> np.ndarray:
        """One synchronous update of the model from every rank's step, and the control
        counters summed in the same all-reduce. Returns the summed control.

        By gradient (the learner is in deferred mode): sum the ranks' pending gradients,
        OR their touched masks where the learner needs them, and apply one step. Otherwise:
        sum every rank's change of the synced arrays since ``before`` and apply the sum."""
        t0 = time.perf_counter()
        ctl = np.asarray(control, dtype=np.float64)
        nbytes = 0
        if self.by_gradient:
            grad, touched = self.learner.pending_update()
            flat = np.concatenate([grad.ravel(), ctl])
        else:
            arrays = self._arrays()
            flat = np.concatenate([(a - b).ravel() for a, b in zip(arrays, before)] + [ctl])
        t_ar = time.perf_counter()
        dist.all_reduce(torch.from_numpy(flat), op=dist.ReduceOp.SUM)
        if self.by_gradient and touched is not None:
            packed = np.packbits(touched.ravel())
            dist.all_reduce(torch.from_numpy(packed), op=dist.ReduceOp.BOR)
            nbytes += packed.nbytes
        self.allreduce_s += time.perf_counter() - t_ar
        if self.by_gradient:
            union = None if touched is None else np.unpackbits(packed, count=touched.size).view(bool)
            self.learner.apply_update(flat[:grad.size].reshape(grad.shape), union)
            total = flat[grad.size:].copy()
        else:
            i = 0
            for a, b in zip(arrays, before):
                np.add(b, flat[i:i + a.size].reshape(a.shape), out=a)
                i += a.size
            total = flat[i:].copy()
            after = getattr(self.learner, "after_sync", None)
            if callable(after):
                after()
        if hasattr(self.learner, "n_learned"):
            self.learner.n_learned = n_before + int(total[0])
        self.bytes_per_step = flat.nbytes + nbytes
        self.comm_s += time.perf_counter() - t0
        return total

    def _write_stats(self, elapsed: float) -> None:
        """With ``TOWERSTREAM_DIST_STATS=PREFIX`` set, write this rank's timing counters
        to ``PREFIX.rank<r>.json`` (benchmarks/bench_distributed.py reads them)."""
        prefix = os.environ.get("TOWERSTREAM_DIST_STATS")
        if not prefix:
            return
        import json

        Path(f"{prefix}.rank{self.rank}.json").write_text(json.dumps({
            "rank": self.rank, "world_size": self.world_size, "steps": self._steps, "elapsed_s": elapsed,
            "events_learned_run": self._learned_run, "comm_s": self.comm_s, "allreduce_s": self.allreduce_s,
            "bytes_per_step": self.bytes_per_step, "cpu_s": time.process_time(), "work": self.work,
            "warmup": self.warmup,
            "mode": self.mode, "gather_s": self.gather_s, "gather_bytes": self.gather_bytes,
            "reduce_bytes": self.reduce_bytes}))

    def digest(self) -> str:
        """:func:`model_digest` of this rank's synced arrays (examples and data-parallel
        modes: :func:`state_digest` of the whole ``state_dict``)."""
        if self.mode in ("examples", "data-parallel"):
            return state_digest(self.learner.state_dict())
        return model_digest(self._arrays())

    def group_metrics(self) -> dict[str, Any]:
        """Cumulative prequential metrics of all ranks together (a collective: every rank
        calls it). The AUC histograms, counts and loss sums of
        :class:`~learners.metrics.PrequentialMetrics` add up across ranks; other metrics
        objects report this rank's own summary."""
        m = self.metrics
        if not hasattr(m, "_pos_hist"):
            return metrics_summary(m)
        from learners.metrics import PrequentialMetrics

        flat = torch.from_numpy(np.concatenate([m._pos_hist, m._neg_hist]).astype(np.float64))
        scalars = torch.tensor([m.n, m.clicks, m._loss_sum], dtype=torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        dist.all_reduce(scalars, op=dist.ReduceOp.SUM)
        merged = PrequentialMetrics(auc_bins=m.auc_bins, auc_logit_range=m.auc_logit_range)
        h = flat.numpy().astype(np.int64)
        merged._pos_hist, merged._neg_hist = h[:m.auc_bins], h[m.auc_bins:]
        n, clicks, loss = scalars.tolist()
        auc, err = merged._binned_auc()
        return {"n": int(n), "clicks": int(clicks), "auc": None if auc != auc else auc, "auc_max_error": err,
                "logloss": loss / n if n else None}

    # ------------------------------------------------------------------ checkpoint

    def _checkpoint(self, ec: EventConsumer, why: str) -> None:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, ({tuple(k): v for k, v in self._offsets.items()}, self.digest()))
        offsets: dict[tuple[str, int], int] = {}
        for part, _ in gathered:
            offsets.update(part)
        digests = [d for _, d in gathered]
        group_metrics = self.group_metrics()
        if self.checkpoint_path is not None and self.rank == 0:
            save_checkpoint(
                self.checkpoint_path, self.learner, nest_offsets(offsets), self._events_learned,
                extra={"group_id": self.group_id, "world_size": self.world_size, "sync_mode": self.mode,
                       "rank_digests": digests,
                       "metrics": group_metrics, "reason": why}, clock=self.wall_clock)
        dist.barrier()  # the checkpoint is durable before any rank commits
        self._checkpoints += 1
        self._learned_at_checkpoint = self._events_learned
        self._last_checkpoint = self.clock()
        try:
            ec.commit({tp: off for tp, off in self._offsets.items()})
        except StreamsError as exc:
            log.warning("rank %d: commit after checkpoint failed, the checkpoint holds the offsets: %s",
                        self.rank, exc)

    # ------------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Ask the group to stop after the step in hand (all ranks checkpoint and exit)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the group gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _open(self) -> tuple[EventConsumer, list[TopicPartition]]:
        producer = make_producer(self.settings)
        # eager: _fill loops until every partition has its share, so a poll must hand back what
        # has arrived rather than wait (librdkafka's consume) to fill a whole batch
        consumer = make_consumer(self.settings, self.group_id, max_poll_records=self.batch_size, eager=True)
        mine = [TopicPartition(self.topics.events, p)
                for p in assign_partitions(consumer.partitions_for(self.topics.events), self.rank, self.world_size)]
        writer = DeadLetterWriter(producer, self.topics.dead_letter, self.group_id, clock=self.wall_clock)
        ec = EventConsumer(consumer, writer, batch_size=self.batch_size, poll_timeout_s=self.poll_timeout_s,
                           producer=producer)
        consumer.assign(mine)
        # keep only this rank's partitions: the checkpoint gathers every rank's own
        owned = set(mine)
        self._offsets = {tp: off for tp, off in self._offsets.items() if tp in owned}
        for tp in mine:
            if tp in self._offsets:
                ec.seek(tp, self._offsets[tp])
        ec.skip_below({tp: self._offsets[tp] for tp in mine if tp in self._offsets})
        for tp in mine:  # every partition has an offset in the checkpoint, read or not
            if tp not in self._offsets:
                pos = consumer.position(tp)
                self._offsets[tp] = 0 if pos is None else int(pos)
        log.info("rank %d of %d owns %s", self.rank, self.world_size, [p for _, p in mine])
        return ec, mine

    def _fill(self, ec: EventConsumer, buffers: dict[TopicPartition, deque], k: int) -> bool:
        """Poll until every partition has ``k`` events buffered or has nothing more to
        read (an empty poll, and the partition's position at its end offset). Returns
        whether any record arrived."""
        got = False
        while True:
            short = [tp for tp, b in buffers.items() if len(b) < k]
            if not short:
                break
            # A short partition already read to its end (as of the last fetch: no round trip)
            # has nothing to wait for: polling for it blocked every step poll_timeout_s once
            # the first partition ran out (0.5 s a step, most of a 1-rank step's wall time).
            # Only when nothing at all is buffered does the step wait for new records.
            waiting = self._behind(ec, short, cached=True)
            if not waiting and any(buffers.values()):
                break
            batch = ec.poll_batch()
            if batch is None:
                if self._caught_up(ec, waiting or short) or self._stop.is_set():
                    break
                continue
            got = True
            self._records += len(batch.records) + batch.dead_lettered
            self._dead += batch.dead_lettered
            for ev, rec in zip(batch.events, batch.records):
                buffers[TopicPartition(rec.topic, rec.partition)].append((ev, rec.offset))
            for tp, off in batch.offsets.items():  # dead letters at a partition's tail move it too
                self._tail[tp] = max(self._tail.get(tp, 0), off)
        return got

    @staticmethod
    def _behind(ec: EventConsumer, partitions: list[TopicPartition], *, cached: bool) -> list[TopicPartition]:
        """The ``partitions`` whose position is short of their end offset: the high watermark
        of the last fetch (``cached``, no round trip; a partition not fetched yet is behind)
        or the broker's answer now (a partition it gives no end for is not)."""
        ends = ec.consumer.end_offsets(partitions, cached=cached)
        unknown = float("inf") if cached else 0
        behind = []
        for tp in partitions:
            pos = ec.consumer.position(tp)
            if pos is None or pos < ends.get(tp, unknown):
                behind.append(tp)
        return behind

    @classmethod
    def _caught_up(cls, ec: EventConsumer, partitions: list[TopicPartition]) -> bool:
        try:
            return not cls._behind(ec, partitions, cached=False)
        except StreamsError as exc:
            log.debug("could not read end offsets: %r", exc)
            return True  # count it as caught up: the next step polls again

    def _take(self, buffers: dict[TopicPartition, deque], k: int) -> list[Any]:
        events: list[Any] = []
        self._taken = []
        for tp, buf in buffers.items():
            start = len(events)
            for _ in range(min(k, len(buf))):
                ev, off = buf.popleft()
                events.append(ev)
                self._offsets[tp] = off + 1
            self._taken.append((tp.partition, sum(ev.kind == "impression" for ev in events[start:])))
            if not buf and self._tail.get(tp, 0) > self._offsets[tp]:
                self._offsets[tp] = self._tail[tp]
        return events

    def run(self) -> RuntimeStats:
        """Step with the group until stopped, idle or ``max_events``; returns this rank's stats."""
        ec, mine = self._open()
        buffers: dict[TopicPartition, deque] = {tp: deque() for tp in mine}
        self._tail: dict[TopicPartition, int] = {}
        k = self.per_partition or max(1, self.batch_size // len(mine))
        started = self._last_checkpoint = last_record = self.clock()
        try:
            while True:
                t_step, cpu_step = time.perf_counter(), time.process_time()
                comm0, ar0 = self.comm_s, self.allreduce_s
                got = self._fill(ec, buffers, k)
                now = self.clock()
                if got:
                    last_record = now
                events = self._take(buffers, k)
                t_read = time.perf_counter()
                imps = [e for e in events if e.kind == "impression"]
                self._skipped += len(events) - len(imps)
                before = None if self.mode != "delta" else [a.copy() for a in self._arrays()]
                n_before = int(getattr(self.learner, "n_learned", 0))
                xs = [event_to_x(e) for e in imps]
                ys = np.fromiter((e.label for e in imps), dtype=np.int64, count=len(imps))
                if imps and self.mode in ("examples", "data-parallel"):  # test this rank's part; learned in the sync
                    self.metrics.update(ys, np.asarray(self.learner.predict_proba_many(xs), dtype=np.float64))
                elif imps:
                    prequential_step(self.learner, xs, ys, self.metrics)
                idle = (not events and self.idle_timeout_s is not None and now - last_record >= self.idle_timeout_s)
                due = (self.rank == 0 and self.checkpoint_every_s is not None
                       and now - self._last_checkpoint >= self.checkpoint_every_s)
                control = [len(imps), self._stop.is_set(), idle, due]
                t_sync = time.perf_counter()
                if self.mode == "examples":
                    total = self._sync_examples(control, xs, ys)
                elif self.mode == "data-parallel":
                    total = self._sync_shards(control, xs, ys)
                else:
                    total = self._sync(before, n_before, control)
                t_end = time.perf_counter()
                self._steps += 1
                learned = int(total[0])
                if learned and not self.warmup["events"]:
                    # the run's first learning step builds the model (and torch imports its
                    # optimiser machinery, ~1 s): start-up, counted apart from the steady state
                    self.warmup = {"events": learned, "wall_s": time.perf_counter() - t_step,
                                   "cpu_s": time.process_time() - cpu_step}
                elif learned:
                    w = self.work
                    w["steps"] += 1
                    w["events"] += learned
                    w["wall_s"] += t_end - t_step
                    w["fill_s"] += t_read - t_step
                    w["predict_s"] += t_sync - t_read
                    w["sync_s"] += t_end - t_sync
                    w["cpu_s"] += time.process_time() - cpu_step
                    w["comm_s"] += self.comm_s - comm0
                    w["allreduce_s"] += self.allreduce_s - ar0
                self._events_learned += learned
                self._learned_run += learned
                stop = (total[1] > 0 or total[2] >= self.world_size
                        or (self.max_events is not None and self._learned_run >= self.max_events))
                n = self.checkpoint_every_n
                if stop or total[3] > 0 or (n is not None and self._events_learned - self._learned_at_checkpoint >= n):
                    self._checkpoint(ec, "stop" if stop else "interval")
                if stop:
                    break
        finally:
            ec.close()
        elapsed = max(self.clock() - started, 1e-9)
        self._write_stats(elapsed)
        return RuntimeStats(
            group_id=self.group_id, learner=str(self.learner.spec["name"]), events_learned=self._events_learned,
            events_learned_run=self._learned_run, events_per_s=self._learned_run / elapsed,
            events_per_s_run=self._learned_run / elapsed, records=self._records, skipped=self._skipped,
            dead_lettered=self._dead, duplicates=0, lag={}, total_lag=None, checkpoints=self._checkpoints,
            last_checkpoint_at=None, elapsed_s=elapsed, metrics=metrics_summary(self.metrics))
