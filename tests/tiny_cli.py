"""The command-line form of tests/test_train.py's tiny() config, shared by the CLI and fault tests: a 16 px,
~60k-parameter UNet whose steps take milliseconds, logging and checkpointing every other step."""


def tiny_cli_args(*extra: str) -> list[str]:
    """`python -m ddpm.train` arguments for the tiny run, then `extra` (later options win)."""
    return [
        "--preset", "quick", "--image_size", "16", "--model.base_channels", "16", "--model.channel_mults", "1,2",
        "--model.groups", "8", "--batch_size", "8", "--log_every", "1", "--sample_every", "0",
        "--checkpoint_every", "2", "--no-progress", *extra,
    ]  # fmt: skip
