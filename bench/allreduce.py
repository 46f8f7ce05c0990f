"""`python -m bench.allreduce`: the all-reduce of ResNet-50's gradients, and how much of it DDP hides.

Two processes on this machine (gloo over loopback, `--threads` intra-op threads each) measure
- the all-reduce of ResNet-50's 25.6M gradients, fp32 and bf16, as one flat tensor and in DDP's buckets (1 MiB
  first bucket, then 25 MiB, filled in reverse parameter order: the order backward produces the gradients),
  issued back to back as DDP does;
- one forward + backward of ResNet-50 in each process without DDP, and the same under DDP with the trainer's
  settings (bucket_cap_mb=25, gradient_as_bucket_view=True): the difference is the communication backward did not
  hide, and 1 - difference / bucketed all-reduce time is the fraction hidden.
It then prints what the same buckets cost with NCCL on 8 GPUs per node and 1-8 nodes at the stated link speeds
(`--predict-only` prints just that). Figures only: nothing here asserts a speed.

`--compile-order` instead compares how torch.compile and DDP combine (a smaller model, `--compile-model`, so that
Inductor compiles it in reasonable time on a CPU): the model compiled and then wrapped in DDP, and the DDP wrapper
compiled, each in its own pair of processes and timed in turns with eager DDP. For each it records, with the same
comm hook, when each of DDP's buckets became ready after backward began (a bucket can only overlap backward if it is
ready before backward ends) and how many pieces DDPOptimizer cut the compiled graph into.
"""
import argparse
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from common import cli
from trainer.models import build_model

MIB = 2**20
FIRST_BUCKET_BYTES = dist._DEFAULT_FIRST_BUCKET_BYTES  # 1 MiB: DDP starts the first all-reduce early
BUCKET_CAP_MB = 25  # DDP's default, which the trainer keeps
WORLD = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bucket_sizes(numels: list, element_bytes: int, first_bytes: int = FIRST_BUCKET_BYTES,
                 cap_bytes: int = BUCKET_CAP_MB * MIB) -> list:
    """Elements per bucket as DDP fills them: parameters in reverse order, a bucket closes once it reaches its cap."""
    sizes, current, cap = [], 0, first_bytes
    for n in reversed(numels):
        current += n
        if current * element_bytes >= cap:
            sizes.append(current)
            current, cap = 0, cap_bytes
    if current:
        sizes.append(current)
    return sizes


def _timed(*fns, reps: int) -> list:
    """Median seconds of each fn() on the slower rank, after one untimed call each; the fns take turns in every
    repetition, so that a change in the machine's load hits them alike; every call starts on all ranks together."""
    for fn in fns:
        fn()
    times = torch.zeros(reps, len(fns), dtype=torch.float64)
    for rep in range(reps):
        for i, fn in enumerate(fns):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[rep, i] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.median(dim=0).values.tolist()


def _all_reduce_together(tensors: list) -> None:
    """All-reduces issued back to back and then awaited, as DDP launches its buckets."""
    for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
        work.wait()


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    model = build_model("resnet50")
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(1000, (args.batch,))

    def step(module):
        F.cross_entropy(module(images), labels).backward()
        model.zero_grad(set_to_none=False)

    result = {"params": sum(p.numel() for p in model.parameters()), "allreduce": []}
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB, gradient_as_bucket_view=True)
    sizes, launched, marks = {}, {}, {}

    def recording_allreduce(state, bucket):
        # DDP's own all-reduce, noting when each bucket's gradients were all ready and how big it is (after its
        # first step DDP re-buckets in the order backward produced the gradients; these are the final buckets).
        launched[bucket.index()] = time.perf_counter()
        sizes[bucket.index()] = bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def ddp_step():
        loss = F.cross_entropy(ddp(images), labels)
        marks["backward"] = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=False)

    ddp.register_comm_hook(None, recording_allreduce)
    # Calling the module itself bypasses DDP: its gradient hooks act only after a forward through DDP.
    result["step_alone_s"], result["step_ddp_s"] = _timed(lambda: step(model), ddp_step, reps=args.reps)
    bucket_numels = [sizes[i] for i in sorted(sizes)]
    result["ddp_bucket_bytes"] = [n * 4 for n in bucket_numels]
    # When, in the last step, each bucket could start its all-reduce: after the last one, backward has nothing
    # left to hide communication behind.
    result["bucket_ready_ms"] = [(launched[i] - marks["backward"]) * 1e3 for i in sorted(launched)]

    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        flat = torch.ones(result["params"], dtype=dtype)
        # bf16: the same buckets as a bf16 compression hook would send them.
        buckets = [torch.ones(n, dtype=dtype) for n in bucket_numels]

        seconds = _timed(lambda t=flat: dist.all_reduce(t), lambda ts=buckets: _all_reduce_together(ts),
                         reps=args.reps)
        for layout, count, t in zip(("flat", "ddp buckets"), (1, len(buckets)), seconds):
            result["allreduce"].append({"dtype": name, "layout": layout, "tensors": count,
                                        "bytes": flat.numel() * flat.element_size(), "seconds": t})
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "init"), args, out), nprocs=WORLD, join=True)
        result = json.loads(Path(out).read_text())
    comm = next(r["seconds"] for r in result["allreduce"] if r["dtype"] == "fp32" and r["layout"] == "ddp buckets")
    exposed = max(0.0, result["step_ddp_s"] - result["step_alone_s"])
    result["exposed_comm_s"] = exposed
    result["overlap_fraction"] = min(1.0, max(0.0, 1 - exposed / comm))
    # Bytes whose all-reduce can start before backward ends: an upper bound on the overlap, whatever the links.
    result["overlap_window"] = 1 - result["ddp_bucket_bytes"][-1] / sum(result["ddp_bucket_bytes"])
    return result


COMPILE_ORDERS = ("eager", "compile_then_ddp", "ddp_then_compile")


def _wrap_in_order(order: str, model: torch.nn.Module) -> tuple:
    """(what the step calls, the DDP module) for one of COMPILE_ORDERS, with the trainer's DDP settings."""
    options = dict(bucket_cap_mb=BUCKET_CAP_MB, gradient_as_bucket_view=True)
    if order == "compile_then_ddp":
        ddp = DistributedDataParallel(torch.compile(model), **options)
        return ddp, ddp
    ddp = DistributedDataParallel(model, **options)
    return (torch.compile(ddp) if order == "ddp_then_compile" else ddp), ddp


class DDPGraphSplits(logging.Handler):
    """While open, collects how many pieces DDPOptimizer cut each compiled graph into (it logs one line per graph
    it splits, at INFO); none means no graph was compiled inside a DDP forward."""

    LOGGER = "torch._dynamo.backends.distributed"

    def __init__(self):
        super().__init__(logging.INFO)
        self.pieces = []

    def emit(self, record: logging.LogRecord) -> None:
        if "DDPOptimizer used bucket cap" in str(record.msg):
            self.pieces.append(record.args[1])

    def __enter__(self) -> "DDPGraphSplits":
        log = logging.getLogger(self.LOGGER)
        self._level = log.level
        log.addHandler(self)
        log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        log = logging.getLogger(self.LOGGER)
        log.removeHandler(self)
        log.setLevel(self._level)


class _OrderRun:
    """One of COMPILE_ORDERS in this process: its model, what its step calls, and when DDP launched each bucket."""

    def __init__(self, order: str, model_name: str):
        torch.manual_seed(0)
        self.order, self.model = order, build_model(model_name)
        self.step_model, ddp = _wrap_in_order(order, self.model)
        self.launched, self.sizes, self.ready = {}, {}, []
        ddp.register_comm_hook(None, self._recording_allreduce)

    def _recording_allreduce(self, state, bucket):
        self.launched[bucket.index()] = time.perf_counter()
        self.sizes[bucket.index()] = bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(self.step_model(images), labels)
        self.launched.clear()
        backward_start = time.perf_counter()
        loss.backward()
        self.model.zero_grad(set_to_none=False)
        self.ready.append([self.launched[i] - backward_start for i in sorted(self.launched)])


def _compile_order_worker(rank: int, world: int, init_file: str, order: str, args: argparse.Namespace,
                          out: str) -> None:
    """Eager DDP and `order`, taking turns in every repetition so that the machine's load hits them alike. One
    compiled order per process: Dynamo's cache is per frame, so a second order here would reuse the first's code."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    images = torch.randn(args.compile_batch, 3, args.compile_image_size, args.compile_image_size)
    labels = torch.randint(1000, (args.compile_batch,))
    runs = [_OrderRun(name, args.compile_model) for name in ("eager", order)]
    result = {}
    for run in runs:
        dist.barrier()
        start = time.perf_counter()
        with DDPGraphSplits() as splits:
            run.step(images, labels)  # compiles; DDP re-buckets in the order backward produced the gradients
        result[run.order] = {"first_step_s": time.perf_counter() - start, "graph_pieces": splits.pieces}
    seconds = _timed(*[functools.partial(run.step, images, labels) for run in runs], reps=args.reps)
    for run, step_s in zip(runs, seconds):
        # The timed steps' buckets are the re-bucketed ones, the same in every step.
        ready_s = torch.tensor(run.ready[-args.reps:], dtype=torch.float64).median(dim=0).values.tolist()
        result[run.order].update(step_s=step_s, bucket_bytes=[run.sizes[i] for i in sorted(run.sizes)],
                                 bucket_ready_s=ready_s)
    result[order]["step_over_eager"] = result[order]["step_s"] / result["eager"]["step_s"]
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def compare_compile_orders(args: argparse.Namespace) -> dict:
    """Per order: DDP's buckets, when each was ready as a fraction of backward, and the overlap window."""
    result = {}
    for order in COMPILE_ORDERS[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_compile_order_worker, args=(WORLD, os.path.join(tmp, "init"), order, args, out), nprocs=WORLD,
                     join=True)
            measured = json.loads(Path(out).read_text())
        result.setdefault("eager", measured["eager"])  # the first group's; each order has its own step_over_eager
        result[order] = measured[order]
    for r in result.values():
        # The bucket ready last holds the first layers' gradients, the last ones backward produces: its launch
        # marks the end of backward's compute. All-reduces can overlap backward from the first launch until then.
        backward_s = max(r["bucket_ready_s"])
        r["backward_s"] = backward_s
        r["bucket_ready_fraction"] = [t / backward_s for t in r["bucket_ready_s"]]
        r["overlap_window"] = 1 - min(r["bucket_ready_s"]) / backward_s
    return result


def print_compile_orders(result: dict, args: argparse.Namespace) -> None:
    print(f"torch.compile and DDP: {args.compile_model} at {args.compile_image_size} px, batch {args.compile_batch}, "
          f"gloo on loopback, {WORLD} processes x {args.threads} thread(s), median of {args.reps} steps")
    print(f"{'order':17} {'graph pieces':>12} {'buckets':>7} {'1st step s':>10} {'step ms':>8} {'/ eager':>7} "
          f"{'backward ms':>11} {'overlap window':>14}  buckets ready at (% of backward; MB)")
    for order, r in result.items():
        pieces = "+".join(map(str, r["graph_pieces"])) or ("-" if order == "eager" else "1 (unsplit)")
        ready = ", ".join(f"{f:.0%} ({b / 1e6:.1f})" for f, b in zip(r["bucket_ready_fraction"], r["bucket_bytes"]))
        print(f"{order:17} {pieces:>12} {len(r['bucket_bytes']):>7} {r['first_step_s']:>10.1f} "
              f"{r['step_s'] * 1e3:>8.0f} {r.get('step_over_eager', 1):>7.2f} {r['backward_s'] * 1e3:>11.0f} "
              f"{r['overlap_window']:>14.0%}  {ready}")


def ring_seconds(nbytes: float, ranks: int, busbw_gbps: float, step_latency_s: float) -> float:
    """Ring all-reduce: every rank sends and receives 2(n-1)/n of the bytes, in 2(n-1) latency-bound steps."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (busbw_gbps * 1e9) + 2 * (ranks - 1) * step_latency_s


def predict(args: argparse.Namespace, bucket_bytes: list) -> list:
    """Per-step all-reduce cost of DDP's buckets with NCCL, and the scaling it allows, for 8 GPUs x 1-8 nodes."""
    step_s = args.batch_per_gpu / args.gpu_img_per_s
    backward_s = step_s * args.backward_share
    rows = []
    for name in ("fp32", "bf16"):
        element_bytes = 4 if name == "fp32" else 2
        buckets = [b * element_bytes // 4 for b in bucket_bytes]  # bf16: the same buckets, compressed
        for nodes in args.nodes:
            ranks = nodes * args.gpus_per_node
            inter_node = nodes > 1
            # Within a node the ring runs on NVLink; across nodes NCCL spreads its channels over all NICs, so the
            # ring's slowest hop has the node's summed NIC bandwidth.
            link = min(args.nvlink_gbps, args.nics * args.nic_gbit / 8) if inter_node else args.nvlink_gbps
            busbw = link * args.efficiency
            latency = args.ib_latency_us * 1e-6 if inter_node else args.nvlink_latency_us * 1e-6
            per_bucket = [ring_seconds(b, ranks, busbw, latency) for b in buckets]
            total = sum(per_bucket)
            # The bucket of the first layers is ready last: its all-reduce can never overlap backward.
            last = per_bucket[-1]
            hidden_exposed = last + max(0.0, total - last - backward_s)
            rows.append({"grads": name, "nodes": nodes, "gpus": ranks, "busbw_GBps": busbw,
                         "comm_ms": total * 1e3, "last_bucket_ms": last * 1e3,
                         "efficiency_no_overlap": step_s / (step_s + total),
                         "efficiency_overlap": step_s / (step_s + hidden_exposed),
                         "img_per_s_overlap": ranks * args.batch_per_gpu / (step_s + hidden_exposed)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.allreduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16", help="gradient dtypes of the all-reduce measurement")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per figure (median)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--batch", type=int, default=4, help="batch of the measured ResNet-50 step")
    parser.add_argument("--image-size", type=int, default=128, help="image side of the measured step")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--predict-only", action="store_true", help="skip the measurement, print the prediction")
    parser.add_argument("--compile-order", action="store_true",
                        help="instead: compare eager DDP, compile-then-DDP and DDP-then-compile")
    parser.add_argument("--compile-model", default="resnet18", help="model of --compile-order")
    parser.add_argument("--compile-batch", type=int, default=8, help="batch of --compile-order")
    parser.add_argument("--compile-image-size", type=int, default=64, help="image side of --compile-order")
    model = parser.add_argument_group("the NCCL prediction's assumptions")
    model.add_argument("--gpus-per-node", type=int, default=8)
    model.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    model.add_argument("--nvlink-gbps", type=float, default=450.0,
                       help="NVLink GB/s per direction per GPU (H100/H200 SXM)")
    model.add_argument("--nics", type=int, default=8, help="InfiniBand NICs per node")
    model.add_argument("--nic-gbit", type=float, default=400.0, help="Gb/s per NIC (NDR)")
    model.add_argument("--efficiency", type=float, default=0.8, help="share of the link rate NCCL reaches at 25 MB")
    model.add_argument("--nvlink-latency-us", type=float, default=1.0, help="latency per ring step within a node")
    model.add_argument("--ib-latency-us", type=float, default=5.0, help="latency per ring step across nodes")
    model.add_argument("--gpu-img-per-s", type=float, default=4000.0, help="one GPU's training images/s")
    model.add_argument("--batch-per-gpu", type=int, default=256)
    model.add_argument("--backward-share", type=float, default=2 / 3, help="backward's share of a step")
    return parser.parse_args(argv)


def allreduce_command(args: argparse.Namespace) -> int:

    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "args": vars(args) | {"json": str(args.json)}}
    if args.compile_order:
        report["compile_order"] = compare_compile_orders(args)
        print_compile_orders(report["compile_order"], args)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    if not args.predict_only:
        m = measure(args)
        report["measured"] = m
        print(f"ResNet-50 gradients ({m['params'] / 1e6:.2f}M), gloo on loopback, {WORLD} processes x {args.threads} "
              f"thread(s), median of {args.reps}")
        print(f"{'dtype':6} {'layout':13} {'tensors':>7} {'MB':>7} {'ms':>8} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for r in m["allreduce"]:
            algbw = r["bytes"] / r["seconds"] / 1e9
            print(f"{r['dtype']:6} {r['layout']:13} {r['tensors']:>7} {r['bytes'] / 1e6:>7.1f} "
                  f"{r['seconds'] * 1e3:>8.1f} {algbw:>11.2f} {algbw * 2 * (WORLD - 1) / WORLD:>11.2f}")
        print(f"\nfwd+bwd, batch {args.batch} at {args.image_size} px: alone {m['step_alone_s'] * 1e3:.0f} ms, "
              f"under DDP {m['step_ddp_s'] * 1e3:.0f} ms -> {m['exposed_comm_s'] * 1e3:.0f} ms of communication "
              f"exposed, {m['overlap_fraction']:.0%} of the bucketed all-reduce hidden behind backward")
        ready = ", ".join(f"{b / 1e6:.1f} MB at {t:.0f} ms"
                          for b, t in zip(m["ddp_bucket_bytes"], m["bucket_ready_ms"]))
        print(f"DDP's buckets, in all-reduce order, ready after backward began: {ready}; "
              f"{m['overlap_window']:.0%} of the bytes can start before backward ends")
    # DDP's buckets as measured; without a measurement, as DDP would first fill them (reverse parameter order).
    buckets = report["measured"]["ddp_bucket_bytes"] if "measured" in report else [
        n * 4 for n in bucket_sizes([p.numel() for p in build_model("resnet50").parameters()], 4)]
    report["prediction_bucket_bytes"] = buckets
    rows = predict(args, buckets)
    report["prediction"] = rows
    step_ms = args.batch_per_gpu / args.gpu_img_per_s * 1e3
    print(f"\nNCCL prediction: ring all-reduce of DDP's buckets; {args.gpus_per_node} GPUs/node, NVLink "
          f"{args.nvlink_gbps:.0f} GB/s, {args.nics} x {args.nic_gbit:.0f} Gb/s IB per node, {args.efficiency:.0%} of "
          f"link rate; step {step_ms:.0f} ms ({args.gpu_img_per_s:.0f} img/s at batch {args.batch_per_gpu}), "
          f"backward {args.backward_share:.0%} of it")
    print(f"{'grads':5} {'nodes':>5} {'GPUs':>5} {'busbw GB/s':>10} {'comm ms':>8} {'last bucket ms':>14} "
          f"{'eff. no overlap':>15} {'eff. overlap':>12} {'img/s':>9}")
    for r in rows:
        print(f"{r['grads']:5} {r['nodes']:>5} {r['gpus']:>5} {r['busbw_GBps']:>10.0f} {r['comm_ms']:>8.2f} "
              f"{r['last_bucket_ms']:>14.2f} {r['efficiency_no_overlap']:>15.1%} {r['efficiency_overlap']:>12.1%} "
              f"{r['img_per_s_overlap']:>9.0f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0



def main(argv=None) -> int:
    return cli.run(parse_args, allreduce_command, argv)


if __name__ == "__main__":
    sys.exit(main())
