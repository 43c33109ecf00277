"""Local devnets of real kvnet-node processes: `python -m devnet run --nodes N --scenario S`."""
