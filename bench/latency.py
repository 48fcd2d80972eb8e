"""Measured latency of the shipped Fashion-MNIST checkpoints before and after compression.

Each checkpoint is compressed to every MAC budget (intrafusion.compress, intra_fusion_repair,
uniform allocation, calibration from training images) with and without round_to, and every
network is timed on `--threads` CPU threads at batch 1 and batch 256: in torch (eager,
inference_mode) and in onnxruntime (the export_onnx graph). Latencies are medians of repeated
runs after one warm-up, each row twice: wall time, and the process's CPU time (all threads; on a
machine shared with other jobs it counts only the time the run was on a CPU, so it is the steadier
measure there; thread-pool spinning is turned off for it). The speed-up (unpruned / compressed
latency) is printed next to the MAC ratio (unpruned / compressed MACs). Accuracy is on the whole
test set.

    python bench/latency.py                      # both checkpoints, MACs 0.5 and 0.25, round_to 8
    python bench/latency.py --models vgg11_bn --macs 0.5 --round-to 8 16

Run it on an otherwise idle machine: the load average is printed with every row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning between runs (CPU time); before torch
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intrafusion.api import compress  # noqa: E402
from intrafusion.evaluation import accuracy  # noqa: E402
from intrafusion.experiments.checkpoints import model_from_state  # noqa: E402
from intrafusion.experiments.data import load_dataset  # noqa: E402
from intrafusion.experiments.grid import GridConfig, calibration_batches, open_checkpoint  # noqa: E402
from intrafusion.export import INPUT_NAME, onnx_model  # noqa: E402
from intrafusion.groups import count_macs_params  # noqa: E402

BATCHES = (1, 256)


def median_seconds(run, repetitions: int) -> dict:
    """{"wall", "cpu"}: median wall and process CPU seconds of `run()` over `repetitions` calls,
    after one warm-up call."""
    run()
    wall, cpu = [], []
    for _ in range(repetitions):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def torch_latency(model: torch.nn.Module, images: torch.Tensor, repetitions: int) -> dict:
    """Median {"wall", "cpu"} seconds of one eager forward pass of `images` (N, 3, 32, 32) under inference_mode."""
    model.eval()

    def run():
        with torch.inference_mode():
            model(images)
    return median_seconds(run, repetitions)


def onnx_latency(model: torch.nn.Module, images: torch.Tensor, repetitions: dict, threads: int) -> dict:
    """{batch: median {"wall", "cpu"} seconds} of onnxruntime on the exported graph, `threads`
    intra-op threads that sleep instead of spinning between runs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_model(model, images[:1]).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return {b: median_seconds(lambda: session.run(None, {INPUT_NAME: images[:b].numpy()}), repetitions[b])
            for b in BATCHES}


def measure(model, images, test_x, test_y, repetitions: dict, threads: int) -> dict:
    """Accuracy, MACs (one image) and {(runtime, batch): {"wall", "cpu"}} of `model`."""
    macs, params = count_macs_params(model, images[:1])
    seconds = {("torch", b): torch_latency(model, images[:b], repetitions[b]) for b in BATCHES}
    seconds |= {("onnx", b): s for b, s in onnx_latency(model, images, repetitions, threads).items()}
    return {"accuracy": accuracy(model, test_x, test_y), "macs": macs, "params": params,
            "seconds": seconds, "load": os.getloadavg()[0]}


def row(name: str, budget: str, round_to, m: dict, base: dict, clock: str) -> str:
    """One Markdown row of `clock` ("wall" or "cpu") latencies in ms, with the speed-up over
    `base` in parentheses."""
    cells = [name, budget, str(round_to or "–"), f"{base['macs'] / m['macs']:.2f}×",
             f"{100 * m['accuracy']:.2f}", clock]
    for key in (("torch", 1), ("torch", 256), ("onnx", 1), ("onnx", 256)):
        now, before = m["seconds"][key][clock], base["seconds"][key][clock]
        cells.append(f"{1000 * now:.2f} ({before / now:.2f}×)")
    cells.append(f"{m['load']:.1f}")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | MACs | round_to | MAC ratio | accuracy % | clock | torch b1 ms | torch b256 ms "
          "| onnxruntime b1 ms | onnxruntime b256 ms | load |\n" + "|---" * 11 + "|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18"])
    parser.add_argument("--macs", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--round-to", nargs="*", type=int, default=[8],
                        help="round_to values tried besides none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", nargs=2, type=int, default=[30, 5], metavar=("B1", "B256"),
                        help="timed repetitions at batch 1 and batch 256")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repetitions = dict(zip(BATCHES, args.reps))
    dataset = load_dataset("fashion-mnist", args.data_dir)
    test_x, test_y = dataset.test_tensors()
    images = test_x[:max(BATCHES)]
    calibration = list(calibration_batches(dataset, 10, 128, seed=1))  # training images
    print(f"{args.threads} threads, torch {torch.__version__}, repetitions {repetitions}, "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print(HEADER, flush=True)
    for name in args.models:
        config = GridConfig(model_name=name, dataset="fashion-mnist")
        state, _ = open_checkpoint(config)
        model = model_from_state(name, dataset.num_classes, state["model_state_dict"],
                                 config.checkpoint_path()).eval()
        base = measure(model, images, test_x, test_y, repetitions, args.threads)
        print(row(name, "1", None, base, base, "wall"), row(name, "1", None, base, base, "cpu"),
              sep="\n", flush=True)
        for macs in args.macs:
            for round_to in [None, *args.round_to]:
                small = compress(model, images[:1], macs=macs, method="intra_fusion_repair",
                                 calibration=calibration, allocation="uniform", round_to=round_to)
                m = measure(small, images, test_x, test_y, repetitions, args.threads)
                print(row(name, str(macs), round_to, m, base, "wall"),
                      row(name, str(macs), round_to, m, base, "cpu"), sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
