"""DDP on the CPU: two Gloo processes train the tiny config; replicas agree, only rank 0 writes, resume is exact."""

import datetime
import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm import checkpoint as ckpt
from ddpm import config as C
from ddpm import train as T

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with Gloo"
)
WORLD_SIZE = 2


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # held open together so the n ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, ports: list[int], tmp: str, config: dict) -> None:
    """One torchrun-like process: the environment torchrun would set, then three train() calls."""
    import warnings

    warnings.filterwarnings("ignore", message="flowers102.*missing")
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    tmp = Path(tmp)
    watched = (str(tmp / "runs"), str(tmp / "cache"))
    writes = []

    def audit(event, args):  # every file this process creates, writes, renames or deletes under `watched`
        if event in ("open", "os.rename", "os.link", "os.remove", "os.mkdir", "os.truncate"):
            path = args[0]
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            path = os.fsdecode(path)
            if event == "open":
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
                    return
            if path.startswith(watched):
                writes.append(f"{event} {path}")

    sys.addaudithook(audit)
    cfg = C.RunConfig.from_dict(config)
    results = {}
    # The first two calls find only torchrun's environment and set up (and tear down) the process group
    # themselves; the third finds one already set up (as a script might) and uses it as is.
    os.environ["MASTER_PORT"] = str(ports[0])
    straight = T.train(cfg, out_dir=tmp / "runs" / "straight", progress=False)
    assert not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])
    T.train(cfg, out_dir=tmp / "runs" / "split", max_steps=2, progress=False)
    os.environ["MASTER_PORT"] = str(ports[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        resumed = T.train(cfg, out_dir=tmp / "runs" / "split", resume=True, progress=False)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    for name, result in (("straight", straight), ("resumed", resumed)):
        results[name] = {
            "step": result.step,
            "model": _digest(result.model.state_dict()),
            "ema": _digest(result.ema.shadow_state_dict()),
        }
    results["writes"] = writes
    (tmp / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, flowers_root):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = C.preset(
        "quick",
        **{
            "image_size": 16,
            "model.base_channels": 16,
            "model.channel_mults": (1, 2),
            "model.groups": 8,
            "model.dropout": 0.1,
            "data.root": str(flowers_root),
            "data.split": "train",
            "data.cache_dir": str(tmp / "cache"),
            "batch_size": 8,
            "grad_accum": 2,
            "max_steps": 4,
            "warmup_steps": 2,
            "log_every": 1,
            "sample_every": 2,
            "sample_n": 2,
            "sample_steps": 2,
            "checkpoint_every": 2,
            "conditional": True,
            "class_dropout": 0.5,
        },
    )
    mp.start_processes(
        _worker, args=(_free_ports(3), str(tmp), cfg.to_dict()), nprocs=WORLD_SIZE, join=True, start_method="spawn"
    )
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_replicas_stay_identical(ddp_run):
    _, (rank0, rank1) = ddp_run
    for run in ("straight", "resumed"):
        assert rank0[run]["step"] == rank1[run]["step"] == 4
        assert rank0[run]["model"] == rank1[run]["model"]
        assert rank0[run]["ema"] == rank1[run]["ema"]


def test_only_rank_zero_writes_files(ddp_run):
    tmp, (rank0, rank1) = ddp_run
    assert rank1["writes"] == []
    written = "\n".join(rank0["writes"])
    for name in ("config.json", "log.jsonl", "loss.png", "step_0000004.pt", "latest.pt", "step_0000002.png"):
        assert name in written, f"rank 0 never wrote {name}"
    run = tmp / "runs" / "straight"
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "latest.pt",
        "log.jsonl",
        "loss.png",
        "samples",
        "step_0000002.pt",
        "step_0000004.pt",
    ]
    state = ckpt.load_checkpoint(run)
    assert state["world_size"] == WORLD_SIZE and len(state["rng"]) == len(state["data"]) == WORLD_SIZE
    # ranks draw different timesteps and noise: their saved RNG states differ
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_resume_under_ddp_matches_an_uninterrupted_run(ddp_run):
    tmp, (rank0, _) = ddp_run
    assert rank0["resumed"]["model"] == rank0["straight"]["model"]
    assert rank0["resumed"]["ema"] == rank0["straight"]["ema"]
    a, b = (ckpt.load_checkpoint(tmp / "runs" / run) for run in ("straight", "split"))
    for key in ("model", "ema", "optimizer"):
        assert _digest(_flat(a[key])) == _digest(_flat(b[key])), key


def _flat(tree, prefix="") -> dict:
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, (dict, list, tuple)):
            out.update(_flat(v, f"{prefix}{k}."))
    return out
