"""Flower's side of bench/vs_flower.py: FedAvg in Flower 1.42's simulation (Ray), PyTorch clients.

Runs inside the Flower venv (bench/requirements-flower.txt), started by vs_flower.py:

    .flower-venv/bin/python bench/flower_fedavg.py '<json settings>'

The same devices as pf-sim: the same partition, hold-out split and preprocessing (from this repo's
numpy-only engine and data code), the same initial weights, the padded LeNet in PyTorch, plain SGD.
Each round's time is between two consecutive server-side evaluations (Flower's `evaluate_fn`,
which runs on the round's critical path as Flower schedules it). Prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def engine_to_torch(weights: dict) -> list[np.ndarray]:
    """pocketfed LeNet weights -> the torch state_dict's order and layout."""
    out = []
    for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        w, b = weights[f"{layer}.weight"], weights[f"{layer}.bias"]
        out += [w if layer.startswith("conv") else w.T.copy(), b.reshape(-1)]
    return [np.ascontiguousarray(a, np.float32) for a in out]


def set_params(model: nn.Module, params: list[np.ndarray]) -> None:
    with torch.no_grad():
        for p, a in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(np.asarray(a, np.float32)))


_CACHE: dict = {}


def _source(settings: dict):
    """(model file, train set, device parts), once per process (Ray actors import this module)."""
    if "source" not in _CACHE:
        from engine import load_model_bytes
        from engine.models import build_model_bytes
        from simulation.shards import device_indices, labels_of, load_split

        model_file = load_model_bytes(build_model_bytes("lenet", settings["seed"]))
        train = load_split(settings["data"], "train")
        parts = device_indices(labels_of(train), settings["devices"], settings["partition"], settings["seed"])
        _CACHE["source"] = model_file, train, parts
    return _CACHE["source"]


def client_data(settings: dict, device: int):
    """A device's training tensors exactly as pf-sim's agent sees them (hold-out split, preprocessing)."""
    from engine.data import Subset, preprocessing_for, split_holdout

    model_file, train, parts = _source(settings)
    indices, _ = split_holdout(np.asarray(parts[device]), settings["holdout"], settings["seed"] * 100_003 + device)
    view = preprocessing_for(model_file).view(Subset(train, indices), model_file)
    x, y = view.get_batch(np.arange(view.size()))
    return torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))


def main() -> None:
    settings = json.loads(sys.argv[1])
    import flower_fedavg as lib  # by reference, so Ray's actors import it rather than unpickle copies
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from engine.data import preprocessing_for
    from simulation.shards import load_split

    seed, devices = settings["seed"], settings["devices"]
    model_file = lib._source(settings)[0]
    test = preprocessing_for(model_file).view(load_split(settings["data"], "test"), model_file)
    test_x, test_y = (torch.from_numpy(np.asarray(a)) for a in test.get_batch(np.arange(test.size())))
    initial = engine_to_torch({k: v.value for k, v in model_file.params.items()})

    class Client(NumPyClient):
        def __init__(self, device: int):
            self.device = device

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = LeNet()
            set_params(model, parameters)
            x, y = lib.client_data(settings, self.device)
            opt = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"])
            gen = torch.Generator().manual_seed(seed * 100_003 + self.device)
            for _ in range(settings["epochs"]):
                order = torch.randperm(len(y), generator=gen)
                for start in range(0, len(y), settings["batch_size"]):
                    idx = order[start : start + settings["batch_size"]]
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            return [p.detach().numpy().copy() for p in model.parameters()], len(y), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    from proc_cpu import tree_cpu_seconds  # bench/ is on PYTHONPATH (vs_flower.py)

    times, cpu, load, accuracy = [], [], [], []

    def evaluate(server_round, parameters, config):
        torch.set_num_threads(1)
        model = LeNet()
        set_params(model, parameters)
        with torch.no_grad():
            logits = model(test_x)
        acc = float((logits.argmax(1) == test_y).float().mean())
        loss = float(nn.functional.cross_entropy(logits, test_y))
        times.append(time.perf_counter())
        cpu.append(tree_cpu_seconds())  # the driver, Ray's raylet, GCS and client actors
        load.append(os.getloadavg()[0])
        if server_round > 0:
            accuracy.append(acc)
            print(json.dumps({"round": server_round, "accuracy": acc}), file=sys.stderr, flush=True)
        return loss, {"accuracy": acc}

    strategy = FedAvg(
        fraction_fit=settings["per_round"] / devices,
        min_fit_clients=settings["per_round"],
        min_available_clients=devices,
        fraction_evaluate=0.0,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=evaluate,
    )

    def server_fn(context: Context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=settings["rounds"]))

    started = time.perf_counter()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=devices,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    rounds = len(times) - 1
    if rounds < 1:
        raise SystemExit("flower_fedavg: Flower's simulation finished no round (see its log above)")
    print(
        json.dumps(
            {
                "s_per_round": (times[-1] - times[0]) / rounds,
                "median_s_per_round": float(np.median(np.diff(times))),
                "cpu_s_per_round": (cpu[-1] - cpu[0]) / rounds,
                "round_marks": times,  # perf_counter at each evaluation (round 0 first)
                "cpu_marks": cpu,
                "load_marks": load,  # 1-minute load average at each mark
                "accuracy_by_round": accuracy,
                "seconds": time.perf_counter() - started,
                "flwr": __import__("flwr").__version__,
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
