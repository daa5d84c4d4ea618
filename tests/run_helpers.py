"""What the training, CLI and fault tests share: the tiny run's command line, and an exact comparison of two
checkpoints' contents."""

import torch


def tiny_cli_args(*extra: str) -> list[str]:
    """`python -m ddpm.train` arguments for tests/test_train.py's tiny() run (a 16 px, ~60k-parameter UNet whose
    steps take milliseconds, logging and checkpointing every other step), then `extra` (later options win)."""
    return [
        "--preset", "quick", "--image_size", "16", "--model.base_channels", "16", "--model.channel_mults", "1,2",
        "--model.groups", "8", "--batch_size", "8", "--log_every", "1", "--sample_every", "0",
        "--checkpoint_every", "2", "--no-progress", *extra,
    ]  # fmt: skip


def assert_identical(a, b, where: str = "") -> None:
    """Tensors (dtype and every bit), dicts, lists and plain values equal all the way down; says where not."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
